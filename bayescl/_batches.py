"""The batch convention shared by data streams, curvature and callbacks.

A batch is ``(x, y)`` or ``(x, y, task_id)``. A model is called as ``model(x)`` for the first and as
``model(x, task_id)`` for the second (multi-head networks route each row to its task's head). Every piece of
bayescl that runs a model over a dataloader goes through :func:`split_batch`, so a user's model only has to
follow this one rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def split_batch(batch: Any) -> tuple[tuple[Tensor, ...], Tensor]:
    """Split a batch into the model's positional inputs and the target.

    Args:
        batch: ``(x, y)`` or ``(x, y, task_id)`` (tuple or list).

    Returns:
        ``(inputs, y)`` where ``inputs`` is ``(x,)`` or ``(x, task_id)``.
    """
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)) or len(batch) not in (2, 3):
        raise ValueError(
            "batch must be a tuple (x, y) or (x, y, task_id); got "
            f"{type(batch).__name__} of length {len(batch) if isinstance(batch, Sequence) else 'n/a'}."
        )
    x, y, *rest = batch
    return (x, *rest), y


def move_inputs(inputs: tuple[Tensor, ...], y: Tensor, device: torch.device, dtype: torch.dtype | None = None):
    """Move ``inputs`` and ``y`` to ``device``; floating inputs are cast to ``dtype`` when given."""

    def mv(t: Tensor) -> Tensor:
        t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

    return tuple(mv(t) for t in inputs), mv(y)


def forward(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    """Call ``model`` with the inputs of :func:`split_batch`."""
    return model(*inputs)
