"""What the curvature passes share: the Fisher and loss choices, batch iteration with a progress bar, and moving a
batch to the parameters' device."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from bayescl._batches import move_inputs, split_batch
from bayescl._checks import check_positive_int, check_real


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


def check_temperature(temperature: float, loss: object) -> float:
    r"""``temperature`` as a float: positive and finite, and other than 1 only for ``loss="ce"``.

    The tempered curvature is that of the likelihood :math:`\operatorname{softmax}(f/T)`,
    :math:`J^\top(\operatorname{diag}p_T - p_Tp_T^\top)J/T^2` with :math:`p_T = \operatorname{softmax}(f/T)`. At a
    confident optimum, where an example's margin :math:`m` (its top logit minus the next) is large, the untempered
    :math:`p(1-p)\approx e^{-m}` all but vanishes, while the tempered one is :math:`\approx e^{-m/T}/T^2`: a
    confident task keeps a curvature it can be held by, and an uncertain one (small :math:`m`) changes little.
    """
    t = check_real(temperature, "temperature", low=0.0, low_open=True)
    if t != 1.0 and loss is not LossType.CE:
        raise ValueError(f"temperature={t} applies to loss='ce' only (a softmax likelihood); use 1 with loss={loss!r}.")
    return t


def iter_batches(dataloader: Iterable[Any], max_batches: int | None, progress: bool, desc: str) -> Iterator[Any]:
    """Yield at most ``max_batches`` batches (with a tqdm bar when ``progress``); raise if the dataloader yields
    none. The bar is closed however the iteration ends."""
    if max_batches is not None:
        check_positive_int(max_batches, "max_batches")
    bar = None
    it: Iterable[Any] = dataloader
    if progress:
        from tqdm.auto import tqdm

        it = bar = tqdm(dataloader, desc=desc, total=_length(dataloader, max_batches))
    count = 0
    try:
        for batch in it:
            if max_batches is not None and count >= max_batches:
                break
            count += 1
            yield batch
    finally:
        if bar is not None:
            bar.close()
    if count == 0:
        raise ValueError("dataloader yielded no batches; curvature needs at least one batch of data.")


def _length(dataloader: Iterable[Any], max_batches: int | None) -> int | None:
    """The number of batches the pass will see, for the progress bar (``None`` when unknown)."""
    try:
        n = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def prepare_batch(batch: Any, ref: Tensor, index: int) -> tuple[tuple[Any, ...], Tensor]:
    """Split ``batch`` into inputs and targets on ``ref``'s device and dtype.

    Raises:
        ValueError: a floating input or target of batch ``index`` holds NaN/inf (checked before any label is
            sampled, so the error names the batch rather than surfacing from ``torch.multinomial``).
    """
    inputs, y = split_batch(batch)
    tensors = tuple(t if isinstance(t, Tensor) else torch.as_tensor(t) for t in inputs)
    tensors, y = move_inputs(tensors, y, ref.device, ref.dtype)  # after the cast: float64 overflow to float32 counts
    for what, t in [(f"input {k}" if len(tensors) > 1 else "input", t) for k, t in enumerate(tensors)] + [("target", y)]:
        if isinstance(t, Tensor) and t.is_floating_point() and not bool(t.isfinite().all()):
            raise ValueError(f"batch {index} of the curvature dataloader has a non-finite (NaN/inf) {what}; the "
                             "curvature pass needs finite data (clean or drop those examples).")
    return tensors, y


def check_finite_outputs(outputs: Tensor, index: int) -> None:
    """Refuse non-finite model outputs of batch ``index`` before labels are sampled from them.

    Raises:
        ValueError: ``outputs`` holds NaN/inf; the batch index is named.
    """
    if not bool(torch.isfinite(outputs.detach()).all()):
        raise ValueError(f"the model's outputs on batch {index} of the curvature dataloader are not finite (NaN/inf) "
                         "at the current weights, so the Fisher is undefined; check the weights (learning rate, "
                         "overflow) and the data of that batch.")


def check_finite_params(params: dict[str, Tensor]) -> None:
    """Refuse a curvature pass at non-finite weights, naming the first such parameter.

    Raises:
        ValueError: a tensor of ``params`` holds NaN/inf.
    """
    for n, p in params.items():
        if not bool(torch.isfinite(p.detach()).all()):
            raise ValueError(f"parameter {n!r} is not finite (NaN/inf), so the curvature at the current weights is "
                             "undefined; fix the training (learning rate, gradient clipping) first.")
