"""A DataLoader that Lightning resumes exactly, mid-epoch included.

Lightning restores a train loader's position only when the loader itself has ``state_dict`` /
``load_state_dict``; a plain :class:`~torch.utils.data.DataLoader` restarts at batch 0 while Lightning keeps
counting from the saved batch index, so part of the epoch is trained twice and the rest never. This loader:

* draws each epoch's order from ``(seed, epoch)`` only (Lightning calls ``set_epoch`` on the sampler at every epoch
  start), so a resumed run sees the same order as an uninterrupted one, shuffled or not;
* saves ``{epoch, yielded}`` and, after ``load_state_dict``, its next iterator skips the ``yielded`` batches the
  saved run had already trained on (Lightning reads a loader with a length without reading ahead, so what was
  yielded is what was trained on).

>>> import torch
>>> from torch.utils.data import TensorDataset
>>> dl = ResumableDataLoader(TensorDataset(torch.arange(6.0)), batch_size=2, shuffle=True, seed=0)
>>> first = [b[0].tolist() for b in dl]
>>> dl.load_state_dict({"epoch": 0, "yielded": 1})  # one batch trained before a stop
>>> [b[0].tolist() for b in dl] == first[1:]
True
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bayescl._checks import check_positive_int


class EpochSampler(Sampler[int]):
    """Indices ``0..n−1`` in an order that depends on ``(seed, epoch)`` only (``shuffle=False``: in order)."""

    def __init__(self, data_source: Sized, shuffle: bool = True, seed: int = 0) -> None:
        self.data_source, self.shuffle, self.seed, self.epoch = data_source, bool(shuffle), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        if not self.shuffle:
            return iter(range(n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(n, generator=g).tolist())


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` over a map-style dataset that Lightning resumes exactly.

    Args:
        dataset: a map-style dataset (with ``__len__``).
        batch_size: examples per batch.
        shuffle: a new order every epoch, drawn from ``(seed, epoch)``.
        seed: the seed of the orders.
        **kwargs: other :class:`~torch.utils.data.DataLoader` arguments (not ``sampler`` or ``batch_sampler``).
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = False, seed: int = 0,
                 **kwargs: Any) -> None:
        for key in ("sampler", "batch_sampler", "generator"):
            if kwargs.get(key) is not None:
                raise ValueError(f"ResumableDataLoader draws its own order; {key}= is not allowed.")
            kwargs.pop(key, None)
        if not isinstance(dataset, Sized):
            raise TypeError(f"ResumableDataLoader needs a dataset with __len__, got {type(dataset).__name__}.")
        self.seed, self._shuffle = int(seed), bool(shuffle)
        super().__init__(dataset, batch_size=check_positive_int(batch_size, "batch_size"),
                         sampler=EpochSampler(dataset, shuffle, seed), **kwargs)
        self._yielded, self._skip = 0, 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        self._yielded = skip
        it = super().__iter__()
        for _ in range(skip):  # the batches the saved run had trained on (their order is the epoch's)
            next(it)
        for batch in it:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The epoch and how far into it the loader has been read."""
        return {"epoch": self.sampler.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the saved epoch: the next iterator starts after the batches the saved run trained on."""
        self.sampler.set_epoch(int(state["epoch"]))
        self._skip = int(state["yielded"])
        if self._skip >= len(self):  # the saved epoch had ended: Lightning starts the next one itself
            self._skip = 0
