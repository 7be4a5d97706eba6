"""Reference networks of the published protocols.

* :class:`MLP` – the single-head MLP (2x100 for permuted MNIST, 2x256 / 2x400 for domain- and class-IL).
* :class:`MultiHeadMLP` – a shared trunk with one head per task (VCL's split-MNIST protocol, 2x256, 2-way heads);
  called as ``model(x, task_id)`` where ``task_id`` is an int or a ``LongTensor`` of shape ``(B,)``.
* :class:`SmallCNN` – two conv layers (optionally with BatchNorm) and a linear classifier, single-head or with one
  head per task (then called as :class:`MultiHeadMLP` is), for the curvature benchmarks.

All accept images ``(B, 1, 28, 28)`` or flat ``(B, 784)`` inputs. The multi-head networks send row ``b`` of the
batch to head ``task_id[b]`` (:func:`route_to_heads`): :math:`f(x_b) = W_{t_b} h(x_b) + c_{t_b}` with the shared
features :math:`h`.
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


def route_to_heads(heads: nn.ModuleList, h: Tensor, task_id: Tensor | int | None, owner: str) -> Tensor:
    r"""Row ``b`` of the features ``h`` through head ``task_id[b]``: :math:`y_b = \mathrm{heads}[t_b](h_b)`.

    Args:
        heads: one module per task.
        h: shared features, ``(B, ...)``.
        task_id: an int (every row of that task) or a ``LongTensor`` of shape ``(B,)``; rows may mix tasks.
        owner: the calling network's name, for the error messages.

    Raises:
        ValueError: ``task_id`` is None or out of ``0..len(heads) - 1``.
    """
    if task_id is None:
        raise ValueError(f"{owner} needs task_id (an int or a LongTensor of shape (batch,)); got None.")
    if isinstance(task_id, int) or (isinstance(task_id, Tensor) and task_id.dim() == 0):
        t = int(task_id)
        if not 0 <= t < len(heads):
            raise ValueError(f"task_id={t} is out of range; allowed: 0..{len(heads) - 1}.")
        return heads[t](h)
    task_id = task_id.to(h.device).long()
    bad = (task_id < 0) | (task_id >= len(heads))
    try:
        invalid = bool(bad.any())
    except RuntimeError:  # inside torch.func transforms (vmap) a data-dependent check is not possible
        invalid = False
    if invalid:
        raise ValueError(f"task_id contains {int(task_id[bad][0])}, out of range; allowed: 0..{len(heads) - 1}.")
    try:  # the usual task-IL batch holds one task: run its head only
        single = task_id.numel() > 0 and bool((task_id == task_id[0]).all())
    except RuntimeError:  # inside torch.func transforms
        single = False
    if single:
        return heads[int(task_id[0])](h)
    out = torch.stack([head(h) for head in heads])  # (T, B, C)
    return out[task_id, torch.arange(h.shape[0], device=h.device)]


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
        return route_to_heads(self.heads, self.trunk(x), task_id, "MultiHeadMLP")


class SmallCNN(nn.Module):
    """Conv(1->16, 5) - [BN] - ReLU - MaxPool(2) - Conv(16->32, 5) - [BN] - ReLU - MaxPool(2) - Linear(512 -> C).

    Args:
        num_classes: outputs of the head (of each head with ``num_tasks``).
        channels: output channels of the two conv layers.
        num_tasks: ``None``: one head, ``head.weight`` / ``head.bias`` (the module and parameter names the CNN always
            had); an int: one head per task, ``heads.t.weight`` / ``heads.t.bias``, and the network is called as
            ``model(x, task_id)`` like :class:`MultiHeadMLP` (rows may mix tasks).
        batchnorm: a ``BatchNorm2d`` after each conv layer, before its ReLU (its running statistics are buffers: see
            :mod:`bayescl.lightning.batchnorm` for what the callbacks do with them across tasks).
    """

    def __init__(self, num_classes: int = 10, channels: Sequence[int] = (16, 32), num_tasks: int | None = None,
                 batchnorm: bool = False) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        if num_tasks is not None:
            check_positive_int(num_tasks, "num_tasks")
        if len(channels) != 2:
            raise ValueError(f"channels={tuple(channels)!r} is not valid; allowed: two positive ints (conv1, conv2).")
        c1, c2 = (check_positive_int(c, f"channels[{i}]") for i, c in enumerate(channels))

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 5), *([nn.BatchNorm2d(c_out)] if batchnorm else []), nn.ReLU(),
                    nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(1, c1), *block(c1, c2), nn.Flatten())
        self.num_tasks = num_tasks
        if num_tasks is None:
            self.head = nn.Linear(c2 * 4 * 4, num_classes)
        else:
            self.heads = nn.ModuleList(nn.Linear(c2 * 4 * 4, num_classes) for _ in range(num_tasks))

    def forward(self, x: Tensor, task_id: Tensor | int | None = None) -> Tensor:
        if x.dim() == 2:
            x = x.reshape(-1, 1, 28, 28)
        h = self.features(x)
        if self.num_tasks is None:
            return self.head(h)
        return route_to_heads(self.heads, h, task_id, "SmallCNN")
