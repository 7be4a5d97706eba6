"""Fixtures shared by the tests of bayescl.methods."""

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def tiny():
    """``tiny(hidden)``: a seeded float64 4 -> hidden -> 3 tanh network."""

    def tiny(hidden: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()

    return tiny
