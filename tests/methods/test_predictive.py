import math

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


# ------------------------------------------------------------------------------------------ dense references
# Every predictive method against a reference built densely on a tiny model: the full covariance Σ (from the
# Kronecker factors with torch.kron, or the diagonal variances), the per-example Jacobian of the flattened
# parameters from torch.func.jacrev, J Σ Jᵀ, and predictives computed from those by hand.
def _net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _kron_posterior(model, terms=1, seed=0):
    """A KronGaussian with random PSD factors, and its dense covariance in the order of ``_flat_jacobian``."""
    g = torch.Generator().manual_seed(seed)
    layers = KronGaussian.isotropic(model, 1.0).layers
    factors, blocks = {}, []
    for layer, (w, _) in layers.items():
        out, p = model.get_parameter(w).shape[0], model.get_parameter(w).shape[1] + 1
        ts, lam = [], 0.3 * torch.eye(out * p, dtype=torch.float64)
        for _ in range(terms):
            A0 = torch.randn(p, p, dtype=torch.float64, generator=g)
            G0 = torch.randn(out, out, dtype=torch.float64, generator=g)
            A, G = A0 @ A0.T / p, G0 @ G0.T / out
            ts.append((A, G, 2.0))
            lam = lam + 2.0 * torch.kron(G, A)  # row-major vec of W̃ = [W, b]
        factors[layer] = ts
        blocks.append(lam)
    mean = {n: t.detach() for n, t in model.named_parameters()}
    q = KronGaussian(mean, layers, factors, {n: 0.3 for n in mean})
    return q, torch.linalg.inv(torch.block_diag(*blocks))


def _diag_posterior(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = {n: t.detach() for n, t in model.named_parameters()}
    prec = {n: 2.0 + torch.rand(t.shape, dtype=torch.float64, generator=g) * 8 for n, t in mean.items()}
    q = DiagGaussian.from_mean_precision(mean, prec)
    cov = torch.diag(torch.cat([1.0 / prec[n].reshape(-1) for n in _order(model, q)]))
    return q, cov


def _order(model, q):
    """Parameter order of the dense references: every layer's row-major ``[W, b]``."""
    return [n for n, _ in model.named_parameters()]


def _flat_jacobian(model, q, x):
    """``J`` ``(B, C, P)``: d logits / d parameters, per Linear layer in row-major ``vec([W, b])`` order."""
    from torch.func import functional_call, jacrev

    params = {n: t.detach() for n, t in model.named_parameters()}
    rows = []
    for row in x:
        jac = jacrev(lambda p, row=row: functional_call(model, p, (row[None],)).squeeze(0))(params)
        cols = []
        for layer in (m for m in model if isinstance(m, nn.Linear)):
            name = next(n for n, mod in model.named_modules() if mod is layer)
            jw, jb = jac[f"{name}.weight"], jac[f"{name}.bias"]
            if isinstance(q, KronGaussian):  # [W, b] row by row
                cols.append(torch.cat([jw, jb[:, :, None]], 2).reshape(jw.shape[0], -1))
            else:  # the parameters one after the other
                cols += [jw.reshape(jw.shape[0], -1), jb]
        rows.append(torch.cat(cols, 1))
    return torch.stack(rows)


def _dense_moments(model, q, cov, x):
    J = _flat_jacobian(model, q, x)
    return model(x).detach(), J @ cov @ J.transpose(1, 2)


def _reference_glm(logits, cov, n, seed):
    """MC of softmax(f), f ~ N(logits, cov), through a Cholesky root (not the package's eigendecomposition)."""
    L = torch.linalg.cholesky(cov + 1e-12 * torch.eye(cov.shape[-1], dtype=cov.dtype))
    eps = torch.randn((n, *logits.shape), dtype=logits.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.softmax(logits + torch.einsum("bcd,sbd->sbc", L, eps), -1).mean(0)


def _reference_mc(model, q, cov, n, x, seed):
    """MC of softmax(f(x; θ)), θ ~ N(μ, Σ) drawn densely (Cholesky of Σ) and mapped back to the parameters."""
    from torch.func import functional_call

    mu = torch.cat([_flat_params(model, q)])
    L = torch.linalg.cholesky(cov)
    z = torch.randn(n, mu.numel(), dtype=mu.dtype, generator=torch.Generator().manual_seed(seed))
    out = 0
    for theta in mu + z @ L.T:
        out = out + torch.softmax(functional_call(model, _unflat(model, q, theta), (x,)), -1)
    return out / n


def _flat_params(model, q):
    parts = []
    for layer in (m for m in model if isinstance(m, nn.Linear)):
        if isinstance(q, KronGaussian):
            parts.append(torch.cat([layer.weight, layer.bias[:, None]], 1).reshape(-1))
        else:
            parts += [layer.weight.reshape(-1), layer.bias]
    return torch.cat(parts).detach()


def _unflat(model, q, theta):
    out, i = {}, 0
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)):
        o, p = layer.weight.shape
        if isinstance(q, KronGaussian):
            blk = theta[i: i + o * (p + 1)].reshape(o, p + 1)
            out[f"{name}.weight"], out[f"{name}.bias"] = blk[:, :p], blk[:, p]
            i += o * (p + 1)
        else:
            out[f"{name}.weight"] = theta[i: i + o * p].reshape(o, p)
            out[f"{name}.bias"] = theta[i + o * p: i + o * p + o]
            i += o * p + o
    return out


KINDS = [("diag", 0), ("kron", 1), ("kron", 2)]  # kron 1 term: the eigenbasis path; 2 terms: dense Cholesky


def _posterior(kind, terms, model):
    return _diag_posterior(model) if kind == "diag" else _kron_posterior(model, terms)


@pytest.mark.parametrize("kind,terms", KINDS)
def test_logit_covariance_and_variances_match_dense_j_sigma_jt(kind, terms):
    from bayescl.methods.predictive import glm_logit_covariance, glm_logit_moments

    model = _net()
    q, cov = _posterior(kind, terms, model)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_logits, ref_cov = _dense_moments(model, q, cov, x)
    logits, c = glm_logit_covariance(model, q, (x,))
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(c, ref_cov, rtol=1e-8, atol=1e-10)
    _, v = glm_logit_moments(model, q, (x,))
    torch.testing.assert_close(v, torch.diagonal(ref_cov, dim1=1, dim2=2), rtol=1e-8, atol=1e-10)
    assert (ref_cov - torch.diag_embed(v)).abs().max() > 1e-3  # the logits are correlated: the test can fail


@pytest.mark.parametrize("kind,terms", KINDS)
def test_probit_matches_its_formula_on_the_dense_variances(kind, terms):
    model = _net()
    q, cov = _posterior(kind, terms, model)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f, fc = _dense_moments(model, q, cov, x)
    v = torch.diagonal(fc, dim1=1, dim2=2)
    ref = torch.softmax(f / torch.sqrt(1 + math.pi * v / 8), -1)
    torch.testing.assert_close(predictive(model, q, (x,), "probit"), ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind,terms", KINDS)
def test_glm_matches_monte_carlo_of_the_dense_logit_gaussian(kind, terms):
    model = _net()
    q, cov = _posterior(kind, terms, model)
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    f, fc = _dense_moments(model, q, cov, x)
    ref = _reference_glm(f, fc, 40_000, seed=0)
    got = predictive(model, q, (x,), "glm", n_samples=40_000, generator=torch.Generator().manual_seed(1))
    assert (got - ref).abs().max() < 0.01  # two independent MC estimates, std ~ 0.5/200


@pytest.mark.parametrize("kind,terms", KINDS)
def test_mc_matches_monte_carlo_of_dense_weight_samples(kind, terms):
    model = _net()
    q, cov = _posterior(kind, terms, model)
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = _reference_mc(model, q, cov, 4000, x, seed=0)
    got = predictive(model, q, (x,), "mc", n_samples=800, generator=torch.Generator().manual_seed(1))
    assert (got - ref).abs().max() < 0.03  # MC std ~ 0.2/sqrt(800) on the package's side
    assert (ref - torch.softmax(model(x), -1)).abs().max() > 0.05  # the weights' spread matters: can fail


def test_common_logit_shift_does_not_blur_the_linearised_predictive():
    """The regression behind the chance-level Kronecker predictive: a head whose output-gradient factor ``G``
    misses the all-ones direction (a softmax Fisher) keeps the prior's huge variance along it. Shifting every
    logit together does not change the softmax, so the full-covariance GLM predictive is the network's softmax,
    while independent logits with the same variances would be near uniform."""
    from bayescl.methods.predictive import glm_logit_covariance, glm_samples

    model = nn.Linear(4, 3).double()
    C, p = 3, 5
    G = 1e6 * (torch.eye(C, dtype=torch.float64) - 1.0 / C)  # null space: the all-ones vector
    q = KronGaussian({n: t.detach() for n, t in model.named_parameters()}, {"": ("weight", "bias")},
                     {"": [(torch.eye(p, dtype=torch.float64), G)]}, {"weight": 1e-4, "bias": 1e-4})
    x = 3 * torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sharp = torch.softmax(model(x), -1).detach()
    logits, cov = glm_logit_covariance(model, q, (x,))
    assert torch.diagonal(cov, dim1=1, dim2=2).min() > 1e3  # huge per-logit variances ...
    glm = predictive(model, q, (x,), "glm", n_samples=200, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(glm, sharp, atol=2e-3, rtol=0)  # ... that do not matter
    indep = glm_samples(logits, torch.diagonal(cov, dim1=1, dim2=2), 200, torch.Generator().manual_seed(0)).mean(0)
    assert (indep - sharp).abs().max() > 0.1
    with pytest.raises(ValueError, match="cov must have shape"):
        glm_samples(logits, cov[:, :2], 4)
