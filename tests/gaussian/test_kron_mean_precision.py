"""The mean of a float32 KronGaussian against a dense float64 solve when the precision is ill-conditioned.

The setting of an online Laplace posterior with a weak base prior (precision ``1e-4``) and a strong curvature
(``G`` times 100, ``A`` from inputs with near-constant features, so nearly collinear with the bias column): a
Kronecker block's condition number is about ``1e9``. The mean comes back only when ``η = Λ μ`` is kept and solved in
float64, with factor eigendecompositions in float64, as the exact inverse of the matrix ``η`` was computed with:
factors accumulated in float32 (``stored="kfac"``) are symmetric only up to rounding and have negative eigenvalues
at rounding level, which the scale makes larger than the base precision (``Λ`` is slightly indefinite); clipping
them in the solve, or reading one triangle of an unsymmetric factor, moves the mean by as much as the weights.
``stored="psd"`` factors are positive definite as stored (the smallest eigenvalue about ``1e-6`` of the largest).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescl.gaussian.kron import KronGaussian
from bayescl.gaussian.server import PosteriorServer, laplace_site

F32, F64 = torch.float32, torch.float64
BASE = 1e-4
#: relative error of the solved mean (max over entries / max |reference|): float32 rounding of the result is ~6e-8,
#: MINRES on the "kfac" two-term layer "2" (indefinite by rounding, condition number 2e10) reaches about 1e-5
RTOL = 1e-4
STORED = ["psd", "kfac"]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def psd32(m: torch.Tensor) -> torch.Tensor:
    """``m`` rounded to float32, shifted by a multiple of ``I`` until it is positive definite as stored (rounding
    alone leaves eigenvalues of about ``±1e-7·‖m‖``; the smallest ends near ``1e-6·‖m‖``)."""
    out, floor = m.float(), 1e-6 * float(torch.linalg.eigvalsh(m.double()).max())
    while (lo := float(torch.linalg.eigvalsh(out.double()).min())) < floor / 2:
        out = out + (floor - lo) * torch.eye(m.shape[0])
    return out


def sym64(m: torch.Tensor) -> torch.Tensor:
    """The symmetric part of ``m``, as a KronGaussian stores it (a float32 ``Xᵀ X`` is symmetric only up to
    rounding), in float64."""
    return (0.5 * (m + m.T)).double()


def gram(x: torch.Tensor, stored: str) -> torch.Tensor:
    """``Xᵀ X / N``: accumulated in float32 (``"kfac"``) or in float64 and made PD as stored (``"psd"``)."""
    return x.T @ x / x.shape[0] if stored == "kfac" else psd32(x.double().T @ x.double() / x.shape[0])


def curvature(model: nn.Module, seed: int, stored: str) -> tuple[KronGaussian, Factors]:
    """A KFAC-like curvature site with ill-conditioned factors, and its float32 factors: ``A`` from inputs with
    near-constant features and the bias column, ``G`` (times 100) from output gradients with two nearly equal
    components."""
    g = torch.Generator().manual_seed(seed)
    n = 64
    x = 3.0 * torch.randn(n, 8, generator=g)
    x[:, :3] = 5.0 + 1e-4 * torch.randn(n, 3, generator=g)
    h = 3.0 * torch.tanh(x @ torch.randn(8, 6, generator=g) / 8)
    h[:, 0] = 2.0 + 1e-4 * torch.randn(n, generator=g)
    factors = {}
    for layer, a, out in (("0", x, 6), ("2", h, 3)):
        dg = 3.0 * torch.randn(n, out, generator=g)
        dg[:, -1] = dg[:, 0] + 1e-4 * torch.randn(n, generator=g)
        factors[layer] = (gram(torch.cat([a, torch.ones(n, 1)], 1), stored), gram(10.0 * dg, stored))
    params = {k: p.detach() for k, p in model.named_parameters()}
    prior = KronGaussian.isotropic(model, BASE)
    return KronGaussian.from_factors(params, factors, prior.layers), factors


def weights(seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights θ* of the MLP's shapes (an optimum found in training)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(p.shape, generator=g) for k, p in mlp().named_parameters()}


def dense(prec: list[Factors], layer: str, n: int) -> torch.Tensor:
    """``BASE·I + Σ G ⊗ A`` of one layer in float64 from the float32 factors, symmetrised (row-major vec of
    ``W̃``)."""
    out = BASE * torch.eye(n, dtype=F64)
    for f in prec:
        A, G = f[layer]
        out = out + torch.kron(sym64(G), sym64(A))
    return out


def block(d: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    return torch.cat([d[f"{layer}.weight"], d[f"{layer}.bias"][:, None]], 1).reshape(-1).double()


def rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """``max |got − ref| / max |ref|`` over all parameters."""
    err = max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref)
    return err / max(float(ref[k].double().abs().max()) for k in ref)


def laplace_chain(model: nn.Module, stored: str) -> tuple[KronGaussian, list, list, list]:
    """prior, the two Laplace sites (θ1 after task 1, θ2 after task 2), their factors and the weights."""
    prior = KronGaussian.isotropic(model, BASE)
    c1, f1 = curvature(model, 1, stored)
    c2, f2 = curvature(model, 2, stored)
    th1, th2 = weights(11), weights(12)
    s1 = laplace_site(prior, c1, th1)
    s2 = laplace_site(prior * s1, c2, th2)
    return prior, [s1, s2], [f1, f2], [th1, th2]


def test_the_settings_are_what_the_tests_claim() -> None:
    """Both: condition number above ``1e8``; ``"kfac"``: the stored factors make ``Λ`` indefinite (negative
    eigenvalues larger than the base precision ``1e-4``)."""
    model = mlp()
    for stored in STORED:
        _, _, (f1, _), _ = laplace_chain(model, stored)
        lam = torch.linalg.eigvalsh(dense([f1], "0", 54))
        assert float(lam.max() / lam.abs().min()) > 1e8
        assert (float(lam.min()) < -BASE) == (stored == "kfac"), stored  # kfac: indefinite by rounding
    assert all(t.dtype == F32 for t in KronGaussian.isotropic(model, BASE).mean.values())


@pytest.mark.parametrize("stored", STORED)
@pytest.mark.parametrize("path", ["eigen", "dense", "minres"])
def test_product_mean_is_the_weights_it_was_centred_on(path: str, stored: str, monkeypatch) -> None:
    """``prior × site`` (one term: the eigen form; two: dense, or MINRES for a large block) is centred on θ*, and
    its ``quadratic_grad`` (float64 inside) vanishes there."""
    model = mlp()
    prior, (s1, s2), _, (th1, th2) = laplace_chain(model, stored)
    if path == "minres":
        monkeypatch.setattr(KronGaussian, "DENSE_LIMIT", 0)
    q, theta = (prior * s1, th1) if path == "eigen" else (prior * s1 * s2, th2)
    mean = q.mean
    assert all(mean[k].dtype == F32 for k in mean)
    assert rel_err(mean, theta) < RTOL
    at, moved = q.quadratic_grad(theta), q.quadratic_grad({k: t + 0.01 for k, t in theta.items()})
    assert max(float(at[k].abs().max()) for k in at) <= 1e-6 * max(float(moved[k].abs().max()) for k in at)


@pytest.mark.parametrize("stored", STORED)
def test_divide_gives_back_the_mean_of_the_smaller_product(stored: str) -> None:
    model = mlp()
    prior, (s1, _), _, (th1, _) = laplace_chain(model, stored)
    c2, _ = curvature(model, 3, stored)
    other = laplace_site(prior * s1, c2, weights(13))
    back = (prior * s1 * other).divide(other)
    assert rel_err(back.mean, th1) < RTOL
    assert rel_err(back.mean, (prior * s1).mean) < RTOL
    assert rel_err((prior * s1 * other.temper(0.5)).divide(other.temper(0.5)).mean, th1) < RTOL


@pytest.mark.parametrize("stored", STORED)
def test_server_forgets_the_first_site_like_a_dense_float64_solve(stored: str) -> None:
    """``prior × s2`` after removing ``s1``: its mean is ``(τI + C2)⁻¹ [(τI + C1 + C2) θ2 − (τI + C1) θ1]``."""
    model = mlp()
    prior, (s1, s2), (f1, f2), (th1, th2) = laplace_chain(model, stored)
    server = PosteriorServer(prior)
    server.add("t1", s1)
    server.add("t2", s2)
    assert rel_err(server.posterior().mean, th2) < RTOL
    server.remove("t1")
    got = server.posterior().mean
    ref = {}
    for layer, out in (("0", 6), ("2", 3)):
        n = out * (model[int(layer)].in_features + 1)
        eta = dense([f1, f2], layer, n) @ block(th2, layer) - dense([f1], layer, n) @ block(th1, layer)
        mu = torch.linalg.solve(dense([f2], layer, n), eta).reshape(out, -1)
        ref[f"{layer}.weight"], ref[f"{layer}.bias"] = mu[:, :-1], mu[:, -1]
    assert rel_err(got, ref) < RTOL


def test_eta_keeps_the_parameters_dtype_and_old_states_load() -> None:
    """Public ``eta`` is float32 like the parameters; a state with float32 ``η`` (saved before ``η`` was kept in
    float64) loads with the float32 ``η`` it had; a state saved now keeps the float64 one."""
    model = mlp()
    prior, (s1, _), _, (th1, _) = laplace_chain(model, "kfac")
    q = prior * s1
    assert all(t.dtype == F32 for t in q.eta.values())
    state = q.state_dict()
    assert all(t.dtype == F64 for t in state["eta"].values())
    old = dict(state, eta={k: t.float() for k, t in state["eta"].items()}, mean=None)
    back = KronGaussian.from_state_dict(old)
    assert all(t.dtype == F32 for t in back.eta.values())
    torch.testing.assert_close(back.eta, q.eta)
    same = KronGaussian.from_state_dict(dict(state, mean=None))
    assert rel_err(same.mean, th1) < RTOL
    into = KronGaussian.isotropic(model, 1.0)
    into.load_state_dict(old)
    assert all(torch.equal(into.eta[k], back.eta[k]) for k in q.names)


def test_dtypes_downstream_and_num_floats() -> None:
    """Everything computed from a float32 KronGaussian stays float32; ``num_floats`` counts the float64 ``η``
    twice (in floats of the parameters' dtype)."""
    model = mlp()
    prior, (s1, _), _, (th1, _) = laplace_chain(model, "kfac")
    q = prior * s1
    assert all(t.dtype == F32 for t in q.quadratic_grad(th1).values())
    assert all(t.dtype == F32 for t in q.sample(generator=torch.Generator().manual_seed(0)).values())
    assert q.logdet().dtype == F32 and q.kl(prior).dtype == F32
    assert all(t.dtype == F32 for t in q.with_mean(model).mean.values())
    n = len(q)
    factors = sum(t.A.numel() + t.G.numel() for ts in q.terms.values() for t in ts)
    assert q.num_floats() == 2 * n + len(q.names) + factors + n  # η, isotropic D, factors, cached mean
    wide = q.to(dtype=F64)
    assert wide.num_floats() == n + len(q.names) + factors + n  # float64 parameters: η counts once
    back = KronGaussian.from_state_dict(wide.to(dtype=F32).state_dict() | {"mean": None})
    assert rel_err(back.mean, th1) < RTOL
