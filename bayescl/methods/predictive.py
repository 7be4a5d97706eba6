r"""Posterior predictive for classification: :math:`p(y\mid x) = \int \mathrm{softmax}(f(x;\theta))\,q(\theta)\,d\theta`.

* ``method="mc"``: average of the softmax over ``n_samples`` weight samples from ``q`` (any Gaussian kind).
* ``method="glm"``: the linearised (GLM) predictive by Monte Carlo over the *logits*,
  :math:`f_s \sim \mathcal N(f(x;\mu), \operatorname{diag} v)` (per-logit variances ``v`` as below; the
  covariance between logits is dropped). Sampling the weights of a Laplace posterior through the whole network
  (``"mc"``) underfits badly when the curvature is near zero in many directions (Immer et al. 2021): those
  weights keep the prior's variance. The linearised predictive only sees them through the Jacobian.
* ``method="probit"``: the linearised (GLM) predictive with the probit / mean-field approximation
  (MacKay 1992; Immer et al. 2021): :math:`f \approx f(x;\mu) + J(\theta-\mu)`, per-logit variance
  :math:`v_c = \sum_p J_{cp}^2 \sigma_p^2` and :math:`p \approx \mathrm{softmax}\big(f(x;\mu)/\sqrt{1+\pi v/8}\big)`.
  For a :class:`~bayescl.gaussian.diag.DiagGaussian` the per-example Jacobians come from ``torch.func``; for a
  :class:`~bayescl.gaussian.kron.KronGaussian` over Linear layers ``v`` is exact in the factors' eigenbasis
  (:func:`glm_logit_moments`), one backward pass per class. The kind is resolved once, in ``_LINEARISED``
  (kind -> Jacobian work); :func:`glm_supported` says whether a posterior and model have it.

The model is called as ``model(*inputs)`` (see :mod:`bayescl._batches`); parameter names are those of the
posterior, which must be a subset of ``model.named_parameters()`` (the rest stay at their current values).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from bayescl._checks import as_enum, check_positive_int
from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kinds import Gaussian
from bayescl.gaussian.kron import KronGaussian


class PredictiveMethod(str, enum.Enum):
    MC = "mc"
    GLM = "glm"
    PROBIT = "probit"


def check_posterior_names(model: nn.Module, posterior: Gaussian) -> dict[str, Tensor]:
    """``model.named_parameters()`` as a dict; ``ValueError`` naming the first parameter of ``posterior`` that is
    not a parameter of ``model``."""
    named = dict(model.named_parameters())
    missing = [n for n in posterior.names if n not in named]
    if missing:
        raise ValueError(f"posterior parameter {missing[0]!r} is not a parameter of {type(model).__name__}.")
    return named


@torch.no_grad()
def predictive(
    model: nn.Module,
    posterior: Gaussian,
    inputs: tuple[Tensor, ...],
    method: str | PredictiveMethod = PredictiveMethod.MC,
    n_samples: int = 32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Predictive class probabilities ``(B, C)`` under ``posterior``.

    Args:
        model: the network (its ``forward`` gives logits).
        posterior: a :class:`DiagGaussian` or :class:`KronGaussian` over (some of) its parameters.
        inputs: the model's positional inputs, ``(x,)`` or ``(x, task_id)``.
        method: ``"mc"``, ``"glm"`` or ``"probit"`` (module docstring).
        n_samples: weight (``"mc"``) or logit (``"glm"``) samples.
        generator: random generator for ``"mc"``.
    """
    method = as_enum(PredictiveMethod, method, "method")
    named = check_posterior_names(model, posterior)
    was_training = model.training
    model.eval()
    try:
        if method is PredictiveMethod.MC:
            check_positive_int(n_samples, "n_samples")
            probs = None
            for _ in range(n_samples):
                theta = posterior.sample(generator=generator)
                theta = {n: t.to(named[n]) for n, t in theta.items()}
                p = torch.softmax(functional_call(model, theta, inputs, strict=False), dim=-1)
                probs = p if probs is None else probs + p
            return probs / n_samples
        logits, v = glm_logit_moments(model, posterior, inputs)
        if method is PredictiveMethod.PROBIT:
            return torch.softmax(logits / torch.sqrt(1.0 + math.pi * v / 8.0), dim=-1)
        return glm_samples(logits, v, n_samples, generator).mean(0)
    finally:
        model.train(was_training)


def glm_logit_moments(model: nn.Module, posterior: Gaussian, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    r"""Mean and per-logit variance of the linearised network: ``(f(x; μ), v)`` with
    :math:`v_{bc} = J_{bc} \Sigma J_{bc}^\top` (``(B, C)`` each).

    * :class:`DiagGaussian`: :math:`v_{bc} = \sum_p J_{bcp}^2 \sigma_p^2`, Jacobians from ``torch.func``.
    * :class:`~bayescl.gaussian.kron.KronGaussian` over ``nn.Linear`` layers: per example the Jacobian of logit ``c``
      w.r.t. a layer's ``W̃ = [W, b]`` is the outer product :math:`\delta_c \tilde a^\top` (output gradient,
      input with a 1 appended), so in the eigenbasis of the block precision
      :math:`\Lambda = (U_G \otimes U_A)\,\mathrm{diag}(\ell)\,(U_G \otimes U_A)^\top`
      :math:`v_{bc} = \sum_{ij} (U_G^\top\delta_c)_i^2 (U_A^\top \tilde a)_j^2 / \ell_{ij}` — one backward pass per
      class, no per-example Jacobian (a block with several terms uses its dense covariance when small, else the
      merged-pair approximation, as :meth:`KronGaussian.sample` does). Parameters outside the Kronecker layers
      use their diagonal. Other layer types (Conv2d) raise; use ``method="mc"`` there.
    """
    kind = _LINEARISED.get(getattr(posterior, "kind", None))
    if kind is None:
        raise TypeError(f"the linearised predictive needs a DiagGaussian or KronGaussian posterior, got "
                        f"{type(posterior).__name__}; use method='mc'.")
    return kind.moments(model, posterior, inputs)


def glm_supported(model: nn.Module, posterior: object) -> bool:
    """Whether :func:`glm_logit_moments` handles ``posterior`` on ``model`` (a DiagGaussian; a KronGaussian whose
    Kronecker layers are all ``nn.Linear``); ``False`` for anything else, ``None`` included."""
    kind = _LINEARISED.get(getattr(posterior, "kind", None))
    return kind is not None and kind.supports(model, posterior)


def _diag_logit_moments(model: nn.Module, posterior: DiagGaussian,
                        inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    named = check_posterior_names(model, posterior)
    mean = {n: t.to(named[n]) for n, t in posterior.mean.items()}
    var = {n: t.to(named[n]) for n, t in posterior.variance.items()}
    logits = functional_call(model, mean, inputs, strict=False)
    return logits, _diag_logit_var(model, mean, var, list(mean), inputs)


def _diag_logit_var(model: nn.Module, mean: dict[str, Tensor], var: dict[str, Tensor], names: list[str],
                    inputs: tuple[Tensor, ...]) -> Tensor:
    """``Σ_p J_{bcp}² σ_p²`` over the parameters ``names`` (the others fixed at ``mean``)."""
    fixed = {n: t for n, t in mean.items() if n not in names}

    def f(params: dict[str, Tensor], *row: Tensor) -> Tensor:
        batched = tuple(r.unsqueeze(0) for r in row)
        return functional_call(model, {**fixed, **params}, batched, strict=False).squeeze(0)

    with torch.enable_grad():
        jac = vmap(jacrev(f), in_dims=(None, *([0] * len(inputs))))({n: mean[n] for n in names}, *inputs)
    return sum((j.pow(2) * var[n]).flatten(2).sum(-1) for n, j in jac.items())


def _kron_logit_moments(model: nn.Module, q: KronGaussian, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    named = check_posterior_names(model, q)
    modules = dict(model.named_modules())
    layers = q.layers
    if (bad := non_linear_kron_layer(model, q)) is not None:
        raise TypeError(f"the linearised Kronecker predictive supports nn.Linear layers; {bad!r} is a "
                        f"{type(modules.get(bad)).__name__}. Use method='mc'.")
    mean = {n: t.to(named[n]).detach().requires_grad_(True) for n, t in q.mean.items()}
    acts: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}

    def hook(name: str):
        def record(mod: nn.Module, args: tuple, out: Tensor) -> None:
            acts[name], outs[name] = args[0].detach(), out
        return record

    handles = [modules[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        with torch.enable_grad():
            logits = functional_call(model, mean, inputs, strict=False)
            v = torch.zeros_like(logits)
            used = [layer for layer in layers if layer in outs]
            for layer in used:
                if acts[layer].dim() != 2:
                    raise ValueError(f"layer {layer!r} got inputs of shape {tuple(acts[layer].shape)}; the "
                                     "linearised Kronecker predictive needs (batch, features). Use method='mc'.")
            factors = {layer: q.block(layer).factor(approx=True) for layer in used}
            for c in range(logits.shape[-1]):
                grads = torch.autograd.grad(logits[:, c].sum(), [outs[layer] for layer in used],
                                            retain_graph=True, allow_unused=True)
                for layer, delta in zip(used, grads):
                    if delta is None:
                        continue
                    a = acts[layer]
                    if layers[layer][1] is not None:
                        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
                    v[:, c] += factors[layer].outer_quadratic(delta.detach(), a)
    finally:
        for h in handles:
            h.remove()
    owned = {n for spec in layers.values() for n in spec if n is not None}
    rest = [n for n in q.names if n not in owned]
    if rest:
        det = {n: t.detach() for n, t in mean.items()}
        diag = q.diag
        v = v + _diag_logit_var(model, det, {n: 1.0 / diag[n].to(det[n]).expand_as(det[n]) for n in rest}, rest,
                                inputs)
    return logits.detach(), v.detach()


def non_linear_kron_layer(model: nn.Module, q: KronGaussian) -> str | None:
    """The first Kronecker layer of ``q`` that is not an ``nn.Linear`` of ``model`` (``None``: all are)."""
    modules = dict(model.named_modules())
    return next((layer for layer in q.layers if not isinstance(modules.get(layer), nn.Linear)), None)


class _Linearised(NamedTuple):
    """The Jacobian work of the linearised predictive for one Gaussian kind."""

    moments: Callable[[nn.Module, Gaussian, tuple[Tensor, ...]], tuple[Tensor, Tensor]]
    supports: Callable[[nn.Module, Gaussian], bool]


#: the one dispatch on the Gaussian kind: kind -> its linearised predictive
_LINEARISED: dict[str, _Linearised] = {
    DiagGaussian.kind: _Linearised(_diag_logit_moments, lambda model, q: True),
    KronGaussian.kind: _Linearised(_kron_logit_moments, lambda model, q: non_linear_kron_layer(model, q) is None),
}


def glm_samples(logits: Tensor, v: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """``(S, B, C)`` softmax samples of logits drawn from ``N(logits, diag v)``."""
    check_positive_int(n_samples, "n_samples")
    eps = torch.randn((n_samples, *logits.shape), dtype=logits.dtype, device=logits.device, generator=generator)
    return torch.softmax(logits + eps * v.sqrt(), dim=-1)
