r"""Posterior predictive for classification: :math:`p(y\mid x) = \int \mathrm{softmax}(f(x;\theta))\,q(\theta)\,d\theta`.

* ``method="mc"``: average of the softmax over ``n_samples`` weight samples from ``q`` (any Gaussian kind).
* ``method="glm"``: the linearised (GLM) predictive by Monte Carlo over the *logits*,
  :math:`f_s \sim \mathcal N(f(x;\mu), J \Sigma J^\top)` with the full ``C × C`` logit covariance per example
  (:func:`glm_logit_covariance`). The covariance between logits matters: the softmax does not change when every
  logit moves by the same amount, and the likelihood never constrains that direction (the Fisher of a softmax
  has the all-ones vector in its null space), so the per-logit variances are dominated by a common shift that
  carries no information; dropping the covariance turns it into independent noise on every logit.
  Sampling the weights of a Laplace posterior through the whole network (``"mc"``) underfits badly when the
  curvature is near zero in many directions (Immer et al. 2021): those weights keep the prior's variance. The
  linearised predictive only sees them through the Jacobian.
* ``method="probit"``: the linearised (GLM) predictive with the probit / mean-field approximation
  (MacKay 1992; Immer et al. 2021): :math:`f \approx f(x;\mu) + J(\theta-\mu)`, per-logit variance
  :math:`v_c = (J \Sigma J^\top)_{cc}` and :math:`p \approx \mathrm{softmax}\big(f(x;\mu)/\sqrt{1+\pi v/8}\big)`
  (the per-logit form of laplace-torch; it sees only the diagonal of the logit covariance).
  For a :class:`~bayescl.gaussian.diag.DiagGaussian` the per-example Jacobians come from ``torch.func``; for a
  :class:`~bayescl.gaussian.kron.KronGaussian` over Linear layers ``v`` is exact in the factors' eigenbasis
  (:func:`glm_logit_covariance`), one backward pass per class. The kind is resolved once, in ``_LINEARISED``
  (kind -> Jacobian work); :func:`glm_supported` says whether a posterior and model have it.

Every method uses the posterior's mean as the weights (``posterior.mean``): a Laplace posterior should be centred
on the network's optimum (:meth:`bayescl.LaplaceCallback.predictive_posterior` is).

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
from bayescl.gaussian.kron_block import BlockFactor


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
        generator: random generator for ``"mc"`` and ``"glm"``.
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
        logits, cov = glm_logit_covariance(model, posterior, inputs)
        if method is PredictiveMethod.PROBIT:
            v = torch.diagonal(cov, dim1=-2, dim2=-1)
            return torch.softmax(logits / torch.sqrt(1.0 + math.pi * v / 8.0), dim=-1)
        return glm_samples(logits, cov, n_samples, generator).mean(0)
    finally:
        model.train(was_training)


def glm_logit_covariance(model: nn.Module, posterior: Gaussian,
                         inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    r"""Mean and covariance of the logits of the linearised network: ``(f(x; μ), J Σ Jᵀ)``, shapes ``(B, C)``
    and ``(B, C, C)``, with :math:`J_b = \partial f(x_b;\theta)/\partial\theta` at the mean and
    :math:`\Sigma` the posterior covariance.

    * :class:`DiagGaussian`: :math:`(J\Sigma J^\top)_{bcd} = \sum_p J_{bcp} J_{bdp} \sigma_p^2`, Jacobians from
      ``torch.func``.
    * :class:`~bayescl.gaussian.kron.KronGaussian` over ``nn.Linear`` layers: per example the Jacobian of logit ``c``
      w.r.t. a layer's ``W̃ = [W, b]`` is the outer product :math:`\delta_c \tilde a^\top` (output gradient,
      input with a 1 appended), so in the eigenbasis of the block precision
      :math:`\Lambda = (U_G \otimes U_A)\,\mathrm{diag}(\ell)\,(U_G \otimes U_A)^\top`
      :math:`(J\Sigma J^\top)_{bcd} = \sum_{ij} (U_G^\top\delta_c)_i (U_G^\top\delta_d)_i (U_A^\top \tilde a)_j^2
      / \ell_{ij}`, summed over the layers (the block-diagonal posterior) — one backward pass per class, no
      per-example Jacobian (a block with several terms uses its dense covariance when small, else the
      merged-pair approximation, as :meth:`KronGaussian.sample` does). Parameters outside the Kronecker layers
      use their diagonal. Other layer types (Conv2d) raise; use ``method="mc"`` there.
    """
    kind = _LINEARISED.get(getattr(posterior, "kind", None))
    if kind is None:
        raise TypeError(f"the linearised predictive needs a DiagGaussian or KronGaussian posterior, got "
                        f"{type(posterior).__name__}; use method='mc'.")
    return kind.covariance(model, posterior, inputs)


def glm_logit_moments(model: nn.Module, posterior: Gaussian, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    r"""Mean and per-logit variance ``(f(x; μ), v)`` of the linearised network, ``(B, C)`` each:
    :math:`v_{bc} = (J \Sigma J^\top)_{bcc}`, the diagonal of :func:`glm_logit_covariance`."""
    logits, cov = glm_logit_covariance(model, posterior, inputs)
    return logits, torch.diagonal(cov, dim1=-2, dim2=-1).clone()


def glm_supported(model: nn.Module, posterior: object) -> bool:
    """Whether :func:`glm_logit_covariance` handles ``posterior`` on ``model`` (a DiagGaussian; a KronGaussian
    whose Kronecker layers are all ``nn.Linear``); ``False`` for anything else, ``None`` included."""
    kind = _LINEARISED.get(getattr(posterior, "kind", None))
    return kind is not None and kind.supports(model, posterior)


def _diag_logit_cov(model: nn.Module, posterior: DiagGaussian,
                    inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    named = check_posterior_names(model, posterior)
    mean = {n: t.to(named[n]) for n, t in posterior.mean.items()}
    var = {n: t.to(named[n]) for n, t in posterior.variance.items()}
    logits = functional_call(model, mean, inputs, strict=False)
    return logits, _jacobian_cov(model, mean, var, list(mean), inputs)


def _jacobian_cov(model: nn.Module, mean: dict[str, Tensor], var: dict[str, Tensor], names: list[str],
                  inputs: tuple[Tensor, ...]) -> Tensor:
    """``Σ_p J_{bcp} J_{bdp} σ_p²`` ``(B, C, C)`` over the parameters ``names`` (the others fixed at ``mean``)."""
    fixed = {n: t for n, t in mean.items() if n not in names}

    def f(params: dict[str, Tensor], *row: Tensor) -> Tensor:
        batched = tuple(r.unsqueeze(0) for r in row)
        return functional_call(model, {**fixed, **params}, batched, strict=False).squeeze(0)

    with torch.enable_grad():
        jac = vmap(jacrev(f), in_dims=(None, *([0] * len(inputs))))({n: mean[n] for n in names}, *inputs)
    return sum(torch.einsum("bcp,bdp,p->bcd", j.flatten(2), j.flatten(2), var[n].expand_as(mean[n]).reshape(-1))
               for n, j in jac.items())


def _block_cov(f: BlockFactor, delta: Tensor, a: Tensor) -> Tensor:
    """``(δ_c ⊗ a) Λ⁻¹ (δ_d ⊗ a)ᵀ`` ``(B, C, C)`` for output gradients ``delta`` ``(B, C, out)`` and inputs ``a``
    ``(B, p)`` of one block factorised as ``f`` (eigen form or dense Cholesky)."""
    if f.chol is not None:
        B, C, _ = delta.shape
        j = (delta[..., :, None] * a[:, None, None, :]).reshape(B, C, -1)
        s = torch.cholesky_solve(j.reshape(B * C, -1).T, f.chol).T.reshape(B, C, -1)
        return torch.einsum("bcp,bdp->bcd", j, s)
    dr = delta if f.ug is None else delta @ f.ug
    ar = a if f.ua is None else a @ f.ua
    w = (ar**2) @ (1.0 / f.lam).T  # (B, out): Σ_j ã_j² / ℓ_ij
    return torch.einsum("bci,bdi,bi->bcd", dr, dr, w)


def _kron_logit_cov(model: nn.Module, q: KronGaussian, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
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
            used = [layer for layer in layers if layer in outs]
            for layer in used:
                if acts[layer].dim() != 2:
                    raise ValueError(f"layer {layer!r} got inputs of shape {tuple(acts[layer].shape)}; the "
                                     "linearised Kronecker predictive needs (batch, features). Use method='mc'.")
            deltas: dict[str, list[Tensor]] = {layer: [] for layer in used}
            for c in range(logits.shape[-1]):
                grads = torch.autograd.grad(logits[:, c].sum(), [outs[layer] for layer in used],
                                            retain_graph=True, allow_unused=True)
                for layer, delta in zip(used, grads):
                    deltas[layer].append(torch.zeros_like(outs[layer]) if delta is None else delta.detach())
    finally:
        for h in handles:
            h.remove()
    B, C = logits.shape
    cov = logits.new_zeros(B, C, C).detach()
    for layer in used:
        a = acts[layer]
        if layers[layer][1] is not None:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        cov = cov + _block_cov(q.block(layer).factor(approx=True), torch.stack(deltas[layer], 1), a)
    owned = {n for spec in layers.values() for n in spec if n is not None}
    rest = [n for n in q.names if n not in owned]
    if rest:
        det = {n: t.detach() for n, t in mean.items()}
        diag = q.diag
        cov = cov + _jacobian_cov(model, det, {n: 1.0 / diag[n].to(det[n]).expand_as(det[n]) for n in rest},
                                  rest, inputs)
    return logits.detach(), cov.detach()


def non_linear_kron_layer(model: nn.Module, q: KronGaussian) -> str | None:
    """The first Kronecker layer of ``q`` that is not an ``nn.Linear`` of ``model`` (``None``: all are)."""
    modules = dict(model.named_modules())
    return next((layer for layer in q.layers if not isinstance(modules.get(layer), nn.Linear)), None)


class _Linearised(NamedTuple):
    """The Jacobian work of the linearised predictive for one Gaussian kind."""

    covariance: Callable[[nn.Module, Gaussian, tuple[Tensor, ...]], tuple[Tensor, Tensor]]
    supports: Callable[[nn.Module, Gaussian], bool]


#: the one dispatch on the Gaussian kind: kind -> its linearised predictive
_LINEARISED: dict[str, _Linearised] = {
    DiagGaussian.kind: _Linearised(_diag_logit_cov, lambda model, q: True),
    KronGaussian.kind: _Linearised(_kron_logit_cov, lambda model, q: non_linear_kron_layer(model, q) is None),
}


def glm_samples(logits: Tensor, cov: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """``(S, B, C)`` softmax samples of logits drawn from ``N(logits, cov)``: ``cov`` is the logit covariance
    ``(B, C, C)`` (:func:`glm_logit_covariance`; its square root from an eigendecomposition, rounding-level
    negative eigenvalues clipped) or per-logit variances ``(B, C)`` (independent logits)."""
    check_positive_int(n_samples, "n_samples")
    if cov.shape not in (logits.shape, (*logits.shape, logits.shape[-1])):
        raise ValueError(f"cov must have shape {tuple(logits.shape)} (variances) or "
                         f"{(*logits.shape, logits.shape[-1])} (covariances); got {tuple(cov.shape)}.")
    eps = torch.randn((n_samples, *logits.shape), dtype=logits.dtype, device=logits.device, generator=generator)
    if cov.dim() == logits.dim():
        return torch.softmax(logits + eps * cov.clamp_min(0).sqrt(), dim=-1)
    w, u = torch.linalg.eigh(cov.double())
    root = (u * w.clamp_min(0).sqrt().unsqueeze(-2)).to(logits.dtype)  # (B, C, C): root @ root.T = cov
    return torch.softmax(logits + torch.einsum("bcd,sbd->sbc", root, eps), dim=-1)
