import pytest
import torch
from torch import nn

from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kron import KronGaussian
from bayescl.harness.models import MultiHeadMLP
from bayescl.methods.predictive import predictive


def test_zero_variance_gives_the_network_softmax(tiny):
    model = tiny(5)
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
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).double()
    with pytest.raises(TypeError, match="'0' is a Conv2d. Use method='mc'"):
        predictive(conv, KronGaussian.isotropic(conv, 1.0, mean="current"),
                   (torch.randn(2, 1, 4, 4, dtype=torch.float64),), "probit")
    with pytest.raises(ValueError, match="'w' is not a parameter"):
        predictive(model, DiagGaussian.isotropic({"w": torch.zeros(2)}, 1.0), (x, t))


def _dense_logit_var(model, q, x):
    """``diag(J Σ Jᵀ)`` per example with the dense ``Σ = Λ⁻¹`` of ``q.to_dense()`` (the reference)."""
    from torch.func import functional_call, jacrev

    order, P = q.to_dense()
    cov = torch.linalg.inv(P)
    params = {n: t.detach() for n, t in q.mean.items()}
    out = []
    for row in x:
        jac = jacrev(lambda p, row=row: functional_call(model, p, (row[None],)).squeeze(0))(params)
        cols = []
        for name in order:
            if name in q.layers:
                w, b = q.layers[name]
                jw = jac[w].reshape(jac[w].shape[0], jac[w].shape[1], -1)
                cols.append(torch.cat([jw, jac[b][:, :, None]], 2).reshape(jw.shape[0], -1))
            else:
                cols.append(jac[name].reshape(jac[name].shape[0], -1))
        J = torch.cat(cols, 1)
        out.append(torch.diagonal(J @ cov @ J.T))
    return torch.stack(out)


@pytest.mark.parametrize("terms", [1, 2])
def test_kron_linearised_variance_matches_dense_covariance(terms):
    """One term: the eigenbasis formula; two terms: the small blocks' dense Cholesky path. LayerNorm's
    parameters sit outside the Kronecker layers (diagonal part)."""
    from bayescl.methods.predictive import glm_logit_moments

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    q = KronGaussian.isotropic(model, precision=0.7, mean="current")
    layers = q.layers
    factors = {}
    for layer, (w, _) in layers.items():
        out, p = model.get_parameter(w).shape[0], model.get_parameter(w).shape[1] + 1
        ts = []
        for _ in range(terms):
            A0, G0 = torch.randn(p, p, dtype=torch.float64), torch.randn(out, out, dtype=torch.float64)
            ts.append((A0 @ A0.T, G0 @ G0.T, 0.5))
        factors[layer] = ts
    mean = {n: t.detach() for n, t in model.named_parameters()}
    q = KronGaussian(mean, layers, factors, {n: 0.7 for n in mean})
    x = torch.randn(6, 4, dtype=torch.float64)
    logits, v = glm_logit_moments(model, q, (x,))
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(v, _dense_logit_var(model, q, x), rtol=1e-8, atol=1e-10)
