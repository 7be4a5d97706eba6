"""Reference networks of the published protocols.

* :class:`MLP` – the single-head MLP (2x100 for permuted MNIST, 2x256 / 2x400 for domain- and class-IL).
* :class:`MultiHeadMLP` – a shared trunk with one head per task (VCL's split-MNIST protocol, 2x256, 2-way heads);
  called as ``model(x, task_id)`` where ``task_id`` is an int or a ``LongTensor`` of shape ``(B,)``.
* :class:`SmallCNN` – two conv layers and a linear classifier, for the curvature benchmarks.

All accept images ``(B, 1, 28, 28)`` or flat ``(B, 784)`` inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bayescl._checks import check_positive_int


def _trunk(in_features: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for i, width in enumerate(hidden):
        check_positive_int(width, f"hidden[{i}]")
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Fully connected ReLU network with a single head."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (100, 100), num_classes: int = 10) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(num_classes, "num_classes")
        self.trunk = _trunk(in_features, hidden)
        self.head = nn.Linear(hidden[-1] if hidden else in_features, num_classes)

    def forward(self, x: Tensor, task_id: Tensor | int | None = None) -> Tensor:
        return self.head(self.trunk(x))


class MultiHeadMLP(nn.Module):
    """Shared ReLU trunk and one linear head per task (task-incremental learning).

    Each row of the batch is sent to the head of its own task, so batches that mix tasks (joint training,
    coresets) work. The parameters of head ``t`` are named ``heads.t.weight`` / ``heads.t.bias``.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (256, 256),
        num_tasks: int = 5,
        classes_per_task: int = 2,
    ) -> None:
        super().__init__()
        check_positive_int(num_tasks, "num_tasks")
        check_positive_int(classes_per_task, "classes_per_task")
        self.trunk = _trunk(in_features, hidden)
        width = hidden[-1] if hidden else in_features
        self.heads = nn.ModuleList(nn.Linear(width, classes_per_task) for _ in range(num_tasks))

    def forward(self, x: Tensor, task_id: Tensor | int | None = None) -> Tensor:
        if task_id is None:
            raise ValueError("MultiHeadMLP needs task_id (an int or a LongTensor of shape (batch,)); got None.")
        h = self.trunk(x)
        if isinstance(task_id, int) or (isinstance(task_id, Tensor) and task_id.dim() == 0):
            t = int(task_id)
            if not 0 <= t < len(self.heads):
                raise ValueError(f"task_id={t} is out of range; allowed: 0..{len(self.heads) - 1}.")
            return self.heads[t](h)
        task_id = task_id.to(h.device).long()
        bad = (task_id < 0) | (task_id >= len(self.heads))
        try:
            invalid = bool(bad.any())
        except RuntimeError:  # inside torch.func transforms (vmap) a data-dependent check is not possible
            invalid = False
        if invalid:
            raise ValueError(
                f"task_id contains {int(task_id[bad][0])}, out of range; allowed: 0..{len(self.heads) - 1}."
            )
        try:  # the usual task-IL batch holds one task: run its head only
            single = task_id.numel() > 0 and bool((task_id == task_id[0]).all())
        except RuntimeError:  # inside torch.func transforms
            single = False
        if single:
            return self.heads[int(task_id[0])](h)
        out = torch.stack([head(h) for head in self.heads])  # (T, B, C)
        return out[task_id, torch.arange(h.shape[0], device=h.device)]


class SmallCNN(nn.Module):
    """Conv(1->16, 5) - ReLU - MaxPool(2) - Conv(16->32, 5) - ReLU - MaxPool(2) - Linear(512 -> classes)."""

    def __init__(self, num_classes: int = 10, channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(c2 * 4 * 4, num_classes)

    def forward(self, x: Tensor, task_id: Tensor | int | None = None) -> Tensor:
        if x.dim() == 2:
            x = x.view(-1, 1, 28, 28)
        return self.head(self.features(x))
