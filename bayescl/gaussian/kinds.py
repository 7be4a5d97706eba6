"""The Gaussian kinds a posterior can have, and rebuilding one from its ``state_dict``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kron import KronGaussian

Gaussian = DiagGaussian | KronGaussian
_KINDS: dict[str, type] = {DiagGaussian.kind: DiagGaussian, KronGaussian.kind: KronGaussian}


def gaussian_from_state_dict(state: Mapping[str, Any]) -> Gaussian:
    """Rebuild a :class:`DiagGaussian` or :class:`KronGaussian` from its ``state_dict`` (by its ``"kind"``)."""
    kind = state.get("kind") if isinstance(state, Mapping) else None
    if kind not in _KINDS:
        raise ValueError(f"state kind={kind!r} is not valid; allowed: {', '.join(map(repr, _KINDS))}.")
    return _KINDS[kind].from_state_dict(state)
