r"""The Bayesian prediction of a network with variational layers, as a plain eval-mode call.

:func:`enable_predictive` registers a forward hook on a root module (of layers from
:mod:`bayescl.methods.variational`): in ``eval()`` mode a call returns ``log((1/S) Σ_s softmax(f_s(x)))``, the log
of the Monte Carlo average of the *probabilities* over ``S = test_samples`` forward passes (the root's output must be
logits over its last dimension). ``argmax`` of that output is the MC-averaged prediction, ``softmax`` of it the
averaged probabilities, and ``cross_entropy`` of it the predictive log-loss, so a plain ``test_step`` gets the
Bayesian prediction unchanged. The sum runs in log space (``logaddexp`` of ``log_softmax``), so a probability that
underflows in one sample does not make the log-loss infinite. An eval-mode call returns log-probabilities at every
``S``, ``S = 1`` included. Code that draws and combines samples itself turns the hook off with :func:`raw_samples`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor, nn

from bayescl._checks import check_positive_int
from bayescl.methods.variational import is_stochastic

__all__ = ["enable_predictive", "predictive_samples", "raw_samples"]

_SAMPLES_ATTR = "_bayescl_test_samples"
_HOOK_ATTR = "_bayescl_predictive_hook"


def _predictive_hook(module: nn.Module, args, kwargs, output):
    n = getattr(module, _SAMPLES_ATTR, 0)
    if module.training or n < 1 or not isinstance(output, Tensor):
        return None
    log_probs = torch.log_softmax(output, dim=-1)
    if n == 1 or not is_stochastic(module):  # every pass of a deterministic network is the same
        return log_probs
    for _ in range(n - 1):  # log-sum-exp of log-probabilities: no softmax underflows to log(0) = -inf
        log_probs = torch.logaddexp(log_probs, torch.log_softmax(module.forward(*args, **kwargs), dim=-1))
    return log_probs - math.log(n)


def enable_predictive(module: nn.Module, test_samples: int) -> nn.Module:
    """In ``eval()`` mode, make ``module(...)`` return ``log`` of the mean softmax over ``test_samples`` samples.

    Idempotent (one hook per module; a second call only changes the number of samples). Every eval-mode call
    returns log-probabilities, whatever ``test_samples`` (``1``: of one sample) and also when the layers use their
    means only (:func:`set_stochastic`); :func:`raw_samples` turns the hook off for code that samples itself.
    """
    check_positive_int(test_samples, "test_samples")
    setattr(module, _SAMPLES_ATTR, test_samples)
    if getattr(module, _HOOK_ATTR, None) is None:
        handle = module.register_forward_hook(_predictive_hook, with_kwargs=True)
        object.__setattr__(module, _HOOK_ATTR, handle)
    return module


@contextmanager
def _samples_attr(module: nn.Module, value: int) -> Iterator[nn.Module]:
    old = getattr(module, _SAMPLES_ATTR, 0)
    setattr(module, _SAMPLES_ATTR, value)
    try:
        yield module
    finally:
        setattr(module, _SAMPLES_ATTR, old)


def predictive_samples(module: nn.Module, test_samples: int) -> AbstractContextManager[nn.Module]:
    """Temporarily average ``test_samples`` samples in eval-mode calls (a context manager)."""
    return _samples_attr(module, check_positive_int(test_samples, "test_samples"))


def raw_samples(module: nn.Module) -> AbstractContextManager[nn.Module]:
    """Temporarily make eval-mode calls return one sample's raw output (logits), as in ``train()`` mode: for code
    that draws and combines the samples itself (a context manager)."""
    return _samples_attr(module, 0)
