r"""What the posterior callbacks need from the process group under Lightning DDP.

The rules, for :class:`~bayescl.lightning.laplace.LaplaceCallback` and :class:`~bayescl.lightning.vcl.VCLCallback`
with ``strategy="ddp"`` (or ``"ddp_find_unused_parameters_true"`` for a multi-head model):

* **N_t is the global task size.** A training loader with a sized dataset is taken to hold the *whole* task on
  every rank: Lightning re-wraps the same dataset with a ``DistributedSampler`` that hands each rank a shard, so
  ``len(dataset)`` is already the global :math:`N_t` (with no collective, and without the examples the sampler
  repeats to pad the shards). The prior term :math:`(\Lambda\theta-\eta)/N_t` is then the same on every rank.
  An ``IterableDataset`` has no length: ``num_examples`` is then the global task size.
* **The curvature pass counts each example once.** Each rank takes the indices ``rank, rank + world_size, …`` of
  the curvature loader's dataset (:func:`rank_share`: disjoint, together exactly the dataset, unlike the padded
  shards of ``DistributedSampler``), sums its curvature over them, and the sums are all-reduced
  (:func:`sum_across_ranks`). The all-reduced tensors are the same on every rank, so every rank builds the same
  site and the posteriors stay bitwise identical.

In one process (or before ``torch.distributed`` is initialised) every helper is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Subset

__all__ = ["is_distributed", "rank_and_world", "rank_share", "sum_across_ranks"]

#: batch size of a rank's curvature share when the original loader does not say (a ``batch_sampler``)
DEFAULT_BATCH_SIZE = 64


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group; ``(0, 1)`` in one process."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def sum_across_ranks(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor summed over the ranks (new tensors; the inputs are not changed).

    Tensors of one dtype and device travel in one flat all-reduce; the result is the same on every rank (the
    collective's output is shared). Every rank must call it with tensors of the same shapes, dtypes and order.
    In one process the tensors are returned as they are.
    """
    tensors = list(tensors)
    if not is_distributed() or not tensors:
        return tensors
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out: list[Tensor] = list(tensors)
    for idx in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view_as(tensors[i])
    return out


def rank_share(loader: Any, batch_size: int | None = None) -> Any:
    """This rank's share of a loader's dataset for the curvature pass: indices ``rank::world_size``, unshuffled.

    Args:
        loader: a DataLoader whose ``dataset`` is the whole task on every rank (Lightning's training loader under
            DDP, or the same loader built in every process).
        batch_size: batch size of the share (default: the loader's own).

    Returns:
        ``loader`` itself in one process; otherwise a DataLoader over the share, with the loader's ``collate_fn``.

    Raises:
        ValueError: under DDP, the loader has no sized dataset (an ``IterableDataset`` cannot be split without
            counting some examples twice or not at all).
    """
    if not is_distributed():
        return loader
    rank, world = rank_and_world()
    ds = getattr(loader, "dataset", None)
    try:
        n = len(ds) if ds is not None else None
    except TypeError:
        n = None
    if n is None:
        raise ValueError(f"under DDP ({world} processes) the curvature pass splits its loader's dataset between the "
                         "ranks (indices rank::world_size) so that each example counts once, but this loader has no "
                         "sized dataset (an IterableDataset?); pass LaplaceCallback(dataloader=...) a map-style one.")
    size = batch_size or getattr(loader, "batch_size", None) or DEFAULT_BATCH_SIZE
    return DataLoader(Subset(ds, range(rank, n, world)), batch_size=size, shuffle=False,
                      collate_fn=getattr(loader, "collate_fn", None))
