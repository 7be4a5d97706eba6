"""What the curvature passes share: the Fisher and loss choices, batch iteration with a progress bar, and moving a
batch to the parameters' device."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from bayescl._batches import move_inputs, split_batch
from bayescl._checks import check_positive_int


class FisherType(str, enum.Enum):
    """Which Fisher estimator (see the module docstring)."""

    EXACT = "exact"
    MC = "mc"
    EMPIRICAL = "empirical"
    BATCH_SQUARED = "batch_squared"


class LossType(str, enum.Enum):
    """Likelihoods with a known Fisher: softmax cross-entropy and Gaussian (``MSELoss(reduction="sum")``)."""

    CE = "ce"
    MSE = "mse"


def iter_batches(dataloader: Iterable[Any], max_batches: int | None, progress: bool, desc: str) -> Iterator[Any]:
    """Yield at most ``max_batches`` batches; raise if the dataloader yields none."""
    if max_batches is not None:
        check_positive_int(max_batches, "max_batches")
    it: Iterable[Any] = dataloader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(dataloader, desc=desc)
    count = 0
    for batch in it:
        if max_batches is not None and count >= max_batches:
            break
        count += 1
        yield batch
    if count == 0:
        raise ValueError("dataloader yielded no batches; curvature needs at least one batch of data.")


def prepare_batch(batch: Any, ref: Tensor) -> tuple[tuple[Any, ...], Tensor]:
    inputs, y = split_batch(batch)
    tensors = tuple(t if isinstance(t, Tensor) else torch.as_tensor(t) for t in inputs)
    return move_inputs(tensors, y, ref.device, ref.dtype)
