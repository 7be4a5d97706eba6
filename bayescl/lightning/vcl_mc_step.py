r"""The Monte Carlo training step of :class:`~bayescl.lightning.vcl.VCLCallback`: the expected loss
:math:`\mathbb E_q[\ell(\theta)] \approx \frac1k \sum_{s=1}^k \ell(\theta_s)` over ``train_samples = k`` samples of
the network, by wrapping the LightningModule's ``training_step`` (at ``setup``; undone at ``teardown``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from bayescl.methods.variational import is_stochastic, tiled

#: attribute of a wrapped ``training_step`` that holds the original
WRAP_ATTR = "_bayescl_mc_wrapped"


def mc_training_step(orig: Callable[..., Any], k: int, module: nn.Module, vectorized: bool) -> Callable[..., Any]:
    """``training_step`` over ``k`` Monte Carlo samples of the network.

    Args:
        orig: the module's bound ``training_step``.
        k: samples per step.
        module: the module whose variational layers draw the noise.
        vectorized: one call on the batch repeated ``k`` times (:func:`~bayescl.methods.variational.tiled`; the
            loss, a batch mean, is then the average over the samples). Otherwise ``k`` calls (fresh noise each)
            with the returned losses averaged.

    A deterministic network (the maximum-likelihood epochs) runs once.

    Raises:
        TypeError: (at a step, ``vectorized=False``) ``training_step`` returns neither a Tensor nor a dict with
            ``"loss"``.
    """

    @functools.wraps(orig)
    def step(*args: Any, **kwargs: Any) -> Any:
        if not is_stochastic(module):
            return orig(*args, **kwargs)
        if vectorized and args:
            with tiled(module, args[0], k) as batch:
                return orig(batch, *args[1:], **kwargs)
        outs = [orig(*args, **kwargs) for _ in range(k)]
        if any(o is None for o in outs):
            return None
        if isinstance(outs[0], Tensor):
            return sum(outs) / k
        if isinstance(outs[0], dict) and "loss" in outs[0]:
            return {**outs[-1], "loss": sum(o["loss"] for o in outs) / k}
        raise TypeError(f"train_samples > 1 needs training_step to return a Tensor or a dict with 'loss', "
                        f"got {type(outs[0]).__name__}.")

    setattr(step, WRAP_ATTR, orig)
    return step


def wrap_training_step(module: nn.Module, k: int, vectorized: bool) -> None:
    """Replace ``module.training_step`` by :func:`mc_training_step` (idempotent; nothing for ``k = 1``)."""
    if k > 1 and not hasattr(module.training_step, WRAP_ATTR):
        module.training_step = mc_training_step(module.training_step, k, module, vectorized)


def unwrap_training_step(module: nn.Module) -> None:
    """Undo :func:`wrap_training_step` (no-op if the step is not wrapped)."""
    if hasattr(module.training_step, WRAP_ATTR) and "training_step" in vars(module):
        del module.training_step
