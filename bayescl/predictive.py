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
  It needs the marginal variances of a :class:`~bayescl.posterior.DiagGaussian`; for a Kronecker posterior use
  ``"mc"``. Per-example Jacobians come from ``torch.func`` (C backward passes per batch, not a per-example loop).

The model is called as ``model(*inputs)`` (see :mod:`bayescl.batches`); parameter names are those of the
posterior, which must be a subset of ``model.named_parameters()`` (the rest stay at their current values).
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from ._checks import as_enum, check_positive_int
from .posterior import DiagGaussian
from .sites import Gaussian


class PredictiveMethod(str, enum.Enum):
    MC = "mc"
    GLM = "glm"
    PROBIT = "probit"


def _check_names(model: nn.Module, posterior: Gaussian) -> dict[str, Tensor]:
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
    named = _check_names(model, posterior)
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
    :math:`v_{bc} = \sum_p J_{bcp}^2 \sigma_p^2` (``(B, C)`` each), Jacobians from ``torch.func``."""
    if not isinstance(posterior, DiagGaussian):
        raise ValueError(f"the linearised predictive needs a DiagGaussian posterior, got {type(posterior).__name__}; "
                         "use method='mc'.")
    named = _check_names(model, posterior)
    mean = {n: t.to(named[n]) for n, t in posterior.mean.items()}
    var = {n: t.to(named[n]) for n, t in posterior.variance.items()}

    def f(params: dict[str, Tensor], *row: Tensor) -> Tensor:
        batched = tuple(r.unsqueeze(0) for r in row)
        return functional_call(model, params, batched, strict=False).squeeze(0)

    logits = functional_call(model, mean, inputs, strict=False)
    with torch.enable_grad():
        jac = vmap(jacrev(f), in_dims=(None, *([0] * len(inputs))))(mean, *inputs)  # name -> (B, C, *shape)
    v = sum((j.pow(2) * var[n]).flatten(2).sum(-1) for n, j in jac.items())
    return logits, v


def glm_samples(logits: Tensor, v: Tensor, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """``(S, B, C)`` softmax samples of logits drawn from ``N(logits, diag v)``."""
    check_positive_int(n_samples, "n_samples")
    eps = torch.randn((n_samples, *logits.shape), dtype=logits.dtype, device=logits.device, generator=generator)
    return torch.softmax(logits + eps * v.sqrt(), dim=-1)
