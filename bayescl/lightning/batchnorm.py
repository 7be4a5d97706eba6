"""BatchNorm's running statistics across tasks.

The running mean and variance of a BatchNorm layer are buffers, not parameters: no posterior holds them, and every
training step of a new task moves them towards that task's inputs, so old tasks are evaluated with statistics they
were not trained with. ``batchnorm="freeze"`` (the default) keeps the statistics of the first task: from the second
task on the BatchNorm layers run in eval mode while training (they normalise with the stored statistics; their
affine weights still train, under the posterior). ``batchnorm="train"`` leaves them to Lightning (they keep moving).
"""

from __future__ import annotations

import enum

from torch import nn

__all__ = ["BatchNormPolicy", "batchnorm_layers", "freeze_running_stats"]


class BatchNormPolicy(str, enum.Enum):
    """What happens to BatchNorm's running statistics after the first task."""

    FREEZE = "freeze"
    TRAIN = "train"


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _BATCHNORM) and m.track_running_stats]


def freeze_running_stats(layers: list[nn.Module]) -> None:
    """Put ``layers`` in eval mode (they normalise with, and no longer update, their running statistics)."""
    for m in layers:
        if m.training:
            m.eval()
