"""Coresets for variational continual learning (Nguyen et al. 2018, section 4).

A coreset is a small set of examples kept from each task. As in the paper it is *held out* of that task's
training data (:func:`split_coreset` returns ``(train_without_coreset, coreset)``), the posterior is learnt on the
rest, and only before prediction a copy of it is fine-tuned on the union of the coresets.

Selection:

* ``random`` – ``size`` examples drawn uniformly without replacement (seeded ``generator``);
* ``kcenter`` – greedy k-center in input space (flattened inputs, Euclidean distance): start at example ``first``
  (0 as in the paper's code), then repeatedly add the example farthest from the chosen set. It covers the input
  space: outliers and rare modes are picked first.

Items of a dataset follow :mod:`bayescl._batches`: ``(x, y)`` or ``(x, y, task_id)``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from bayescl._checks import as_enum, check_positive_int


class CoresetMethod(str, enum.Enum):
    RANDOM = "random"
    KCENTER = "kcenter"


def _check_size(size: int, n: int) -> int:
    check_positive_int(size, "coreset_size")
    if size >= n:
        raise ValueError(f"coreset_size={size} is too large for a task of {n} examples; it must be smaller than "
                         "the task (the coreset is held out of training).")
    return size


def random_coreset(n: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """``size`` distinct indices out of ``range(n)``, uniformly at random."""
    _check_size(size, n)
    return torch.randperm(n, generator=generator)[:size].sort().values


def kcenter_coreset(x: Tensor, size: int, first: int = 0) -> Tensor:
    """Greedy k-center: indices (in selection order) of ``size`` rows of ``x`` (flattened) covering the data.

    Each new index is the row farthest (Euclidean) from the rows chosen so far.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a Tensor of shape (N, ...), got {type(x).__name__}.")
    n = x.shape[0]
    _check_size(size, n)
    if not 0 <= first < n:
        raise ValueError(f"first={first} is out of range; allowed: 0..{n - 1}.")
    flat = x.reshape(n, -1).double()
    dist = torch.full((n,), float("inf"), dtype=torch.float64)
    chosen = [first]
    for _ in range(size):
        d = (flat - flat[chosen[-1]]).pow(2).sum(1)
        dist = torch.minimum(dist, d)
        if len(chosen) == size:
            break
        chosen.append(int(dist.argmax()))
    return torch.tensor(chosen, dtype=torch.long)


def stack_dataset(dataset: Dataset, indices: Sequence[int] | Tensor | None = None) -> tuple[Tensor, ...]:
    """The items of ``dataset`` (or of ``indices`` of it) stacked into tensors ``(x, y[, task_id])``.

    ``TensorDataset`` and ``Subset`` of one are sliced directly; other datasets are read item by item.
    """
    idx = None if indices is None else torch.as_tensor(indices, dtype=torch.long)
    base: Dataset = dataset
    if isinstance(base, Subset) and isinstance(base.dataset, TensorDataset):
        sub = torch.as_tensor(base.indices, dtype=torch.long)
        idx = sub if idx is None else sub[idx]
        base = base.dataset
    if isinstance(base, TensorDataset):
        return tuple(t if idx is None else t[idx] for t in base.tensors)
    rows = range(len(dataset)) if idx is None else idx.tolist()  # type: ignore[arg-type]
    items = [dataset[i] for i in rows]
    if not items:
        raise ValueError("stack_dataset got no items; the dataset (or the index list) is empty.")
    return tuple(torch.stack([torch.as_tensor(it[j]) for it in items]) for j in range(len(items[0])))


def select_coreset(dataset: Dataset, size: int, method: CoresetMethod | str = "random",
                   generator: torch.Generator | None = None) -> Tensor:
    """Indices of a coreset of ``dataset`` (``method``: ``"random"`` or ``"kcenter"``).

    Raises:
        ValueError: ``size`` is not smaller than the dataset, or an unknown method.
    """
    m = as_enum(CoresetMethod, method, "coreset_method")
    n = len(dataset)  # type: ignore[arg-type]
    _check_size(size, n)
    if m is CoresetMethod.RANDOM:
        return random_coreset(n, size, generator)
    return kcenter_coreset(stack_dataset(dataset)[0], size)


def split_coreset(dataset: Dataset, size: int, method: CoresetMethod | str = "random",
                  generator: torch.Generator | None = None) -> tuple[Subset, Subset]:
    """Split a task's dataset into ``(train_without_coreset, coreset)`` (two ``Subset`` views, no copy)."""
    chosen = select_coreset(dataset, size, method, generator)
    mask = torch.ones(len(dataset), dtype=torch.bool)  # type: ignore[arg-type]
    mask[chosen] = False
    rest = torch.nonzero(mask).flatten()
    return Subset(dataset, rest.tolist()), Subset(dataset, chosen.tolist())
