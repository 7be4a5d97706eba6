r"""Samples of a posterior predictive, one function for every predictive the uncertainty metrics score.

:func:`mc_probs` returns ``S`` probability vectors per example, ``(S, B, C)``, whose mean is the predictive and
whose spread is the epistemic part of its entropy (:mod:`bayescl.methods.uncertainty`):

* ``method="glm"`` (the default wherever :func:`~bayescl.methods.predictive.glm_supported` holds: a
  :class:`~bayescl.gaussian.diag.DiagGaussian`, a :class:`~bayescl.gaussian.kron.KronGaussian` over ``nn.Linear``
  layers): the linearised predictive, logits :math:`f_s \sim \mathcal N(f(x;\mu), J\Sigma J^\top)` with the full
  logit covariance (:func:`~bayescl.methods.predictive.glm_logit_covariance`);
* ``method="mc"``: weights :math:`\theta_s \sim q` run through the network (``torch.func.functional_call``);
* no posterior: the variational layers' own weight samples (after ``VCLCallback``), or the network's softmax.

:func:`sampler` fixes the method and, for ``"mc"``, the ``S`` weight draws once, so that an evaluation over many
batches scores one fixed predictive; :func:`~bayescl.methods.uncertainty.evaluate_uncertainty` and
:func:`mc_probs` both use it, so they agree on the same posterior and examples (before, the evaluation always
sampled weights, ``"mc"``, while ``mc_probs`` defaulted to ``"glm"``: 77.7 % vs 98.7 % accuracy on one posterior).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bayescl._checks import check_positive_int
from bayescl._params import eval_mode
from bayescl.methods.predictive import check_posterior_names, glm_logit_covariance, glm_samples, glm_supported
from bayescl.methods.variational import is_stochastic
from bayescl.methods.variational_predictive import raw_samples

#: the methods :func:`mc_probs` samples
METHODS = ("glm", "mc")


def resolve_method(model: nn.Module, posterior: Any | None, method: str | None) -> str | None:
    """The sampling method for ``posterior`` on ``model``: ``method`` checked, or the default (``"glm"`` where
    supported, else ``"mc"``); ``None`` without a posterior (the model samples itself or is a point estimate)."""
    if method is not None and method not in METHODS:
        raise ValueError(f"method={method!r} is not valid; allowed: 'glm', 'mc' (or None for the default).")
    if posterior is None:
        return None
    if method is None:
        return "glm" if glm_supported(model, posterior) else "mc"
    return method


def _draw_weights(model: nn.Module, posterior: Any, n_samples: int,
                  generator: torch.Generator | None) -> list[dict[str, Tensor]]:
    """``n_samples`` draws of ``posterior.sample`` cast to the model's parameters (one call per draw, as in
    :func:`bayescl.methods.predictive.predictive`, so the same generator gives the same weights)."""
    named = check_posterior_names(model, posterior)
    return [{n: t.to(named[n]) for n, t in posterior.sample(generator=generator).items()} for _ in range(n_samples)]


def _probs(model: nn.Module, weights: list[dict[str, Tensor]] | None, inputs: tuple[Tensor, ...],
           n_samples: int) -> Tensor:
    if weights is not None:
        return torch.stack([torch.softmax(functional_call(model, w, inputs, strict=False), dim=-1) for w in weights])
    if not is_stochastic(model):
        return torch.softmax(model(*inputs), dim=-1).unsqueeze(0)
    with raw_samples(model):
        return torch.stack([torch.softmax(model(*inputs), dim=-1) for _ in range(n_samples)])


def sampler(model: nn.Module, posterior: Any | None, n_samples: int, generator: torch.Generator | None = None,
            method: str | None = None) -> Callable[[tuple[Tensor, ...]], Tensor]:
    """``inputs -> (S, B, C)`` probability samples of one fixed predictive (module docstring); call it with the
    model in ``eval()`` mode. ``"mc"`` draws its ``S`` weight samples here, once, for every later call."""
    check_positive_int(n_samples, "n_samples")
    method = resolve_method(model, posterior, method)
    if method == "glm":
        def linearised(inputs: tuple[Tensor, ...]) -> Tensor:
            logits, cov = glm_logit_covariance(model, posterior, inputs)
            return glm_samples(logits, cov, n_samples, generator)

        return linearised
    weights = None if posterior is None else _draw_weights(model, posterior, n_samples, generator)
    return lambda inputs: _probs(model, weights, inputs, n_samples)


@torch.no_grad()
def mc_probs(model: nn.Module, posterior: Any | None, inputs: tuple[Tensor, ...], n_samples: int = 16,
             generator: torch.Generator | None = None, method: str | None = None) -> Tensor:
    """Monte Carlo samples ``(S, B, C)`` of the softmax of ``model(*inputs)`` under the weight posterior.

    * ``method="glm"`` / ``"mc"`` / no posterior: see the module docstring. With the same generator state, the
      mean of these samples is :func:`bayescl.methods.predictive.predictive` with the same ``method``.
    * ``posterior=None`` and a model whose variational layers sample themselves: ``S`` eval-mode calls, one weight
      sample each (``generator`` is not used); a deterministic model: its softmax, ``S = 1``.

    ``posterior`` is over (some of) ``model``'s parameters (e.g. ``LaplaceCallback.predictive_posterior()`` with
    the LightningModule as ``model``). The model is put in ``eval()`` mode for the calls and restored afterwards.
    """
    check_positive_int(n_samples, "n_samples")
    if not isinstance(inputs, tuple):
        raise TypeError(f"inputs must be a tuple of the model's positional inputs, got {type(inputs).__name__}.")
    resolve_method(model, posterior, method)
    with eval_mode(model):
        return sampler(model, posterior, n_samples, generator, method)(inputs)


def posterior_for(callbacks: Iterable[Any], module: nn.Module) -> Any | None:
    """The weight posterior :func:`mc_probs` should sample for ``module``: that of the first callback with a
    ``predictive_posterior()`` (Laplace: centred on the last optimum, the base prior precision fitted for
    prediction) or ``posterior()`` over parameters of ``module``; ``None`` otherwise (no posterior yet, a point
    estimate, or VCL, whose layers sample themselves)."""
    named = {n for n, _ in module.named_parameters()}
    for cb in callbacks:
        get = getattr(cb, "predictive_posterior", None) or getattr(cb, "posterior", None)
        if not callable(get):
            continue
        try:
            q = get()
        except (RuntimeError, ValueError):
            continue
        if q is not None and all(n in named for n in q.names):
            return q
    return None
