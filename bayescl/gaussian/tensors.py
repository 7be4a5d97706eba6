"""Named tensors, the domain of every Gaussian here: the mapping type ``name -> Tensor``, its validators and the
checks both Gaussian kinds share (same names and shapes, a known ``state_dict`` kind, a precision left by a
subtraction). Every error names the argument and what is allowed."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

Params = Mapping[str, Tensor] | nn.Module

#: Relative tolerance below which a negative precision produced by a subtraction is taken as rounding (-> 0).
ROUND_TOL = 1e-9


class MeanInit(str, enum.Enum):
    """Where the mean of an isotropic Gaussian comes from."""

    ZEROS = "zeros"
    CURRENT = "current"


def initial_mean(t: Tensor, init: MeanInit) -> Tensor:
    """A copy of ``t`` (``MeanInit.CURRENT``) or zeros of its shape (``MeanInit.ZEROS``)."""
    return t.clone() if init is MeanInit.CURRENT else torch.zeros_like(t)


def named_tensors(params: Params, name: str = "params", *, detach: bool = True) -> dict[str, Tensor]:
    """Return ``params`` as an ordered ``dict`` name -> tensor.

    Args:
        params: an ``nn.Module`` (its ``named_parameters()`` with ``requires_grad``) or a mapping name -> Tensor.
        name: the argument name used in error messages.
        detach: detach the tensors (keep ``False`` when the result must stay differentiable).
    """
    if isinstance(params, nn.Module):
        items = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    elif isinstance(params, Mapping):
        items = list(params.items())
    else:
        raise TypeError(f"{name} must be an nn.Module or a mapping name -> Tensor, got {type(params).__name__}.")
    out: dict[str, Tensor] = {}
    for n, t in items:
        if not isinstance(n, str) or not isinstance(t, Tensor):
            raise TypeError(f"{name} must map str -> Tensor; entry {n!r} is {type(t).__name__}.")
        out[n] = t.detach() if detach else t
    return out


def check_same_names(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "other") -> None:
    """Raise ``ValueError`` naming the first parameter that is missing on one side or has another shape."""
    for n, t in a.items():
        if n not in b:
            raise ValueError(f"parameter {n!r} is in self but not in {what}; both must hold the same parameters.")
        if tuple(b[n].shape) != tuple(t.shape):
            raise ValueError(
                f"parameter {n!r} has shape {tuple(t.shape)} in self but {tuple(b[n].shape)} in {what}; "
                "shapes must match."
            )
    for n in b:
        if n not in a:
            raise ValueError(f"parameter {n!r} is in {what} but not in self; both must hold the same parameters.")


def check_tensors(tensors: Mapping[str, Tensor], what: str, ref: Tensor | None = None) -> Tensor | None:
    """Check that all tensors are floating, finite and share dtype/device (with ``ref`` if given)."""
    for n, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{what}[{n!r}] must be a floating-point Tensor, got {getattr(t, 'dtype', type(t))}.")
        if ref is None:
            ref = t
        if t.dtype != ref.dtype:
            raise ValueError(f"{what}[{n!r}] has dtype {t.dtype} but other tensors have {ref.dtype}; use one dtype.")
        if t.device != ref.device:
            raise ValueError(
                f"{what}[{n!r}] is on device {t.device} but other tensors are on {ref.device}; use one device."
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}[{n!r}] contains non-finite values; all entries must be finite.")
    return ref


def check_known(names: Iterable[str], known: Mapping[str, Any]) -> list[str]:
    """``names`` as a list; ``KeyError`` naming the first one that is not in ``known``."""
    names = list(names)
    for n in names:
        if n not in known:
            raise KeyError(f"parameter {n!r} is not in this Gaussian; known: {', '.join(known)}.")
    return names


def check_new_shapes(tensors: Mapping[str, Tensor], held: Mapping[str, Tensor]) -> None:
    """``ValueError`` naming the first tensor of ``tensors`` already ``held`` with another shape."""
    for n, t in tensors.items():
        if n in held and tuple(t.shape) != tuple(held[n].shape):
            raise ValueError(f"parameter {n!r} has shape {tuple(t.shape)} in params but "
                             f"{tuple(held[n].shape)} in self; shapes must match.")


def check_state_kind(state: object, kind: str, cls_name: str) -> Mapping[str, Any]:
    """``state`` if it is a mapping with ``"kind": kind``; ``ValueError`` naming the kind found otherwise."""
    if not isinstance(state, Mapping) or state.get("kind") != kind:
        got = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"state kind={got!r} cannot be loaded into {cls_name}; expected {kind!r}.")
    return state


def nonneg_precision(prec: Tensor, ref: Tensor, name: str, what: str, allow_zero: bool) -> Tensor:
    """Clamp rounding-level negatives of a subtracted precision to 0 (``|λ| <= ROUND_TOL·|ref|``); raise
    ``ValueError`` naming the parameter on real negatives (or, unless ``allow_zero``, on zeros)."""
    tol = ROUND_TOL * ref.abs()
    if bool((prec < -tol).any()):
        raise ValueError(
            f"{what}: parameter {name!r} would get negative precision (min {float(prec.min()):.3g}); "
            "the divisor must not hold more precision than the dividend."
        )
    prec = torch.where(prec.abs() <= tol, torch.zeros_like(prec), prec)
    if not allow_zero and bool((prec <= 0).any()):
        raise ValueError(
            f"{what}: parameter {name!r} would get precision <= 0 on {int((prec <= 0).sum())} entries; "
            "the result must be proper (pass allow_improper=True to keep an improper site)."
        )
    return prec


def first_dtype_device(tensors: Mapping[str, Tensor]) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the first tensor (torch's defaults for an empty mapping)."""
    t = next(iter(tensors.values()), None)
    return (torch.get_default_dtype(), torch.device("cpu")) if t is None else (t.dtype, t.device)
