"""Fixtures shared by the Gaussian tests: small float64 building blocks, each a factory (session-scoped, so that the
hypothesis tests may use them too)."""

from __future__ import annotations

import pytest
import torch

from bayescl.gaussian.diag import DiagGaussian

DT = torch.float64


@pytest.fixture(scope="session")
def flat():
    """``flat(d)``: the tensors of a name -> tensor dict, reshaped and concatenated in the dict's order."""

    def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in d.values()])

    return flat


@pytest.fixture(scope="session")
def psd():
    """``psd(n, g, rank=None)``: a random n x n positive (semi-)definite matrix, X Xᵀ / k with X n x k (k = rank or
    n + 2)."""

    def psd(n: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
        x = torch.randn(n, rank or n + 2, generator=g, dtype=DT)
        return x @ x.T / x.shape[1]

    return psd


@pytest.fixture(scope="session")
def prior():
    """``prior(shapes, precision)``: the isotropic zero-mean DiagGaussian over the named shapes."""

    def prior(shapes: dict[str, tuple[int, ...]], precision: float) -> DiagGaussian:
        return DiagGaussian.isotropic({n: torch.zeros(s, dtype=DT) for n, s in shapes.items()}, precision)

    return prior
