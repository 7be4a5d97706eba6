"""The Gaussian kinds a posterior can have, the check that an argument is one, and rebuilding one from its
``state_dict``.

Both kinds share one interface, so callers call a method instead of testing the kind: the algebra (``*``,
``divide``, ``temper``, ``with_mean``), densities (``kl``, ``log_prob``, ``sample``, ``quadratic``,
``quadratic_grad``), structure (``restrict``, ``extend``, ``to``), persistence (``state_dict``), and
``elementwise_precision()`` / ``blocks()`` (the elementwise part of ``Λ`` and its Kronecker blocks, none for a
diagonal Gaussian), ``data_spectrum(τ₀)`` and ``with_base_precision(old, new)`` (the Laplace evidence).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kron import KronGaussian

Gaussian = DiagGaussian | KronGaussian
_KINDS: dict[str, type] = {DiagGaussian.kind: DiagGaussian, KronGaussian.kind: KronGaussian}


def check_gaussian(q: object, name: str = "posterior") -> Gaussian:
    """``q`` if it is a :class:`DiagGaussian` or :class:`KronGaussian`; ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(q, (DiagGaussian, KronGaussian)):
        raise TypeError(f"{name} must be a DiagGaussian or KronGaussian, got {type(q).__name__}.")
    return q


def gaussian_from_state_dict(state: Mapping[str, Any]) -> Gaussian:
    """Rebuild a :class:`DiagGaussian` or :class:`KronGaussian` from its ``state_dict`` (by its ``"kind"``)."""
    kind = state.get("kind") if isinstance(state, Mapping) else None
    if kind not in _KINDS:
        raise ValueError(f"state kind={kind!r} is not valid; allowed: {', '.join(map(repr, _KINDS))}.")
    return _KINDS[kind].from_state_dict(state)
