"""The Gaussian kinds a posterior can have, the check that an argument is one, and rebuilding one from its
``state_dict``.

Both kinds share one interface, so callers call a method instead of testing the kind: the algebra (``*``,
``divide``, ``temper``, ``with_mean``), densities (``kl``, ``log_prob``, ``sample``, ``quadratic``,
``quadratic_grad``), structure (``restrict``, ``extend``, ``to``), persistence (``state_dict``), and
``elementwise_precision()`` / ``blocks()`` (the elementwise part of ``Λ`` and its Kronecker blocks, none for a
diagonal Gaussian), ``precision_diagonal()`` (the diagonal of ``Λ``), ``data_spectrum(τ₀)`` and ``with_base_precision(old, new)`` (the Laplace evidence).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kron import KronGaussian

Gaussian = DiagGaussian | KronGaussian
_KINDS: dict[str, type] = {DiagGaussian.kind: DiagGaussian, KronGaussian.kind: KronGaussian}


def check_gaussian(q: object, name: str = "posterior") -> Gaussian:
    """``q`` if it is a :class:`DiagGaussian` or :class:`KronGaussian`; ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(q, (DiagGaussian, KronGaussian)):
        raise TypeError(f"{name} must be a DiagGaussian or KronGaussian, got {type(q).__name__}.")
    return q


def mean_precision(q: Gaussian) -> float:
    r"""The mean of the diagonal of ``q``'s precision over the entries where it is positive (0.0 if there are none).

    For a curvature site (a task's summed Fisher or GGN) this is the scale of the task's curvature: a classifier
    that fits its task with large margins has a Fisher :math:`p(1-p) \approx e^{-m}` near zero, one that does not
    has a large one, and the mean tells them apart. Entries the task never touched (exact zeros) are left out, so
    unused heads or inputs do not dilute it. Summed in float64.
    """
    return mean_positive(check_gaussian(q, "q").precision_diagonal().values())


def normalizing_factor(tensors: Iterable[Tensor], num_examples: float) -> float:
    r""":math:`N / \bar S` for a curvature :math:`S` summed over :math:`N` examples, given as the tensors of its
    diagonal (:math:`\bar S`: :func:`mean_positive`): the multiplier that leaves :math:`S` a mean precision of 1
    per touched weight and per example, whatever the scale of the Fisher. ``normalize=True`` in
    :class:`~bayescl.lightning.laplace.LaplaceCallback` and the strategy multiplies it by ``lam``. 0.0 when no entry
    is positive (nothing to normalise)."""
    mean = mean_positive(tensors)
    return float(num_examples) / mean if mean > 0 else 0.0


def mean_positive(tensors: Iterable[Tensor]) -> float:
    """The mean of the positive entries of ``tensors`` (0.0 if there are none), summed in float64: the scale of a
    diagonal curvature given as tensors (:func:`mean_precision` of a Gaussian is this of its precision's diagonal)."""
    total, count = 0.0, 0
    for d in tensors:
        pos = d[d > 0]
        total += float(pos.double().sum())
        count += pos.numel()
    return total / count if count else 0.0


def gaussian_from_state_dict(state: Mapping[str, Any]) -> Gaussian:
    """Rebuild a :class:`DiagGaussian` or :class:`KronGaussian` from its ``state_dict`` (by its ``"kind"``)."""
    kind = state.get("kind") if isinstance(state, Mapping) else None
    if kind not in _KINDS:
        raise ValueError(f"state kind={kind!r} is not valid; allowed: {', '.join(map(repr, _KINDS))}.")
    return _KINDS[kind].from_state_dict(state)
