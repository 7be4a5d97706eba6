import pytest
import torch
from torch import nn

from bayescl.kron import KronGaussian
from bayescl.models import MultiHeadMLP
from bayescl.posterior import DiagGaussian
from bayescl.predictive import predictive


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_zero_variance_gives_the_network_softmax():
    model = tiny()
    x = torch.randn(6, 4, dtype=torch.float64)
    q = DiagGaussian.isotropic(model, precision=1e12, mean="current")
    expected = torch.softmax(model(x), -1)
    torch.testing.assert_close(predictive(model, q, (x,), "mc", n_samples=4), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(predictive(model, q, (x,), "probit"), expected, atol=1e-6, rtol=0)
    qk = KronGaussian.isotropic(model, precision=1e12, mean="current")
    torch.testing.assert_close(predictive(model, qk, (x,), "mc", n_samples=2), expected, atol=1e-5, rtol=0)


def test_probit_matches_monte_carlo_of_the_linearised_model_for_a_linear_net():
    """For a linear model the linearisation is exact: probit ≈ MC (the probit formula's own error is small)."""
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    q = DiagGaussian.isotropic(model, precision=4.0, mean="current")
    mc = predictive(model, q, (x,), "mc", n_samples=4000, generator=torch.Generator().manual_seed(0))
    pr = predictive(model, q, (x,), "probit")
    assert (mc - pr).abs().max() < 0.04
    # uncertainty pulls the predictive towards uniform
    sharp = torch.softmax(model(x), -1)
    assert torch.all((pr - 0.5).abs() <= (sharp - 0.5).abs() + 1e-12)


def test_multi_head_inputs_and_errors():
    model = MultiHeadMLP(in_features=4, hidden=(3,), num_tasks=2).double()
    x, t = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    q = DiagGaussian.isotropic(model, precision=1e3, mean="current")
    p = predictive(model, q, (x, t), "probit")
    torch.testing.assert_close(p.sum(-1), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="method='laplace'"):
        predictive(model, q, (x, t), "laplace")
    with pytest.raises(ValueError, match="DiagGaussian"):
        predictive(tiny(), KronGaussian.isotropic(tiny(), 1.0), (torch.randn(2, 4, dtype=torch.float64),), "probit")
    with pytest.raises(ValueError, match="'w' is not a parameter"):
        predictive(model, DiagGaussian.isotropic({"w": torch.zeros(2)}, 1.0), (x, t))
