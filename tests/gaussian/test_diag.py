"""DiagGaussian against dense torch.distributions references (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

from bayescl.gaussian.diag import DiagGaussian, add_diag_gaussian_kl_grad_, diag_gaussian_kl
from bayescl.gaussian.diag_kl import add_diag_gaussian_kl_grads_

DT = torch.float64
SHAPES = {"a": (3,), "b": (2, 2)}


def rand(seed: int, zero_frac: float = 0.0) -> DiagGaussian:
    g = torch.Generator().manual_seed(seed)
    mean = {n: torch.randn(s, generator=g, dtype=DT) for n, s in SHAPES.items()}
    prec = {n: 0.2 + 2 * torch.rand(s, generator=g, dtype=DT) for n, s in SHAPES.items()}
    if zero_frac:
        prec = {n: torch.where(torch.rand(s, generator=g, dtype=DT) < zero_frac, 0.0, p)
                for (n, s), p in zip(SHAPES.items(), prec.values(), strict=True)}
    return DiagGaussian.from_mean_precision(mean, prec)


@pytest.fixture(scope="session")
def mvn(flat):
    """``mvn(q)``: the dense torch MultivariateNormal of a DiagGaussian."""

    def mvn(q: DiagGaussian) -> MultivariateNormal:
        return MultivariateNormal(flat(q.mean), precision_matrix=torch.diag(flat(q.precision)))

    return mvn


def test_product_and_division_against_dense(flat) -> None:
    q1, q2 = rand(0), rand(1)
    prod = q1 * q2
    l1, l2 = torch.diag(flat(q1.precision)), torch.diag(flat(q2.precision))
    mu = torch.linalg.solve(l1 + l2, l1 @ flat(q1.mean) + l2 @ flat(q2.mean))
    torch.testing.assert_close(flat(prod.mean), mu)
    torch.testing.assert_close(flat(prod.precision), torch.diagonal(l1 + l2))
    # log q1 + log q2 − log(q1·q2) is constant in θ (normalised product)
    t1, t2 = q2.sample(generator=torch.Generator().manual_seed(0)), q1.mean
    c1 = q1.log_prob(t1) + q2.log_prob(t1) - prod.log_prob(t1)
    c2 = q1.log_prob(t2) + q2.log_prob(t2) - prod.log_prob(t2)
    assert c1.item() == pytest.approx(c2.item(), rel=1e-12)
    back = prod / q2
    torch.testing.assert_close(flat(back.mean), flat(q1.mean))
    torch.testing.assert_close(flat(back.precision), flat(q1.precision))
    sq = q1 ** 2.0
    torch.testing.assert_close(flat(sq.mean), flat(q1.mean))
    torch.testing.assert_close(flat(sq.precision), 2 * flat(q1.precision))


def test_kl_log_prob_against_torch_distributions(flat, mvn) -> None:
    q1, q2 = rand(2), rand(3)
    assert q1.kl(q2).item() == pytest.approx(kl_divergence(mvn(q1), mvn(q2)).item(), rel=1e-12)
    theta = {n: torch.full(s, 0.3, dtype=DT) for n, s in SHAPES.items()}
    assert q1.log_prob(theta).item() == pytest.approx(mvn(q1).log_prob(flat(theta)).item(), rel=1e-12)


def test_closed_form_kl_gradient_matches_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    mu, lv = torch.randn(4, 3, dtype=DT, generator=g), torch.randn(4, 3, dtype=DT, generator=g) - 2
    pm, pp = torch.randn(4, 3, dtype=DT, generator=g), torch.rand(4, 3, dtype=DT, generator=g) * 5 + 0.1
    mu, lv = mu.requires_grad_(), lv.requires_grad_()
    ref = diag_gaussian_kl(mu, lv, pm, pp)
    gm, gl = torch.autograd.grad(ref, (mu, lv))
    mu.grad = torch.ones_like(mu)  # an existing data gradient is added to
    kl = add_diag_gaussian_kl_grad_(mu, lv, pm, pp, scale=0.25)
    assert lv.grad is not None
    torch.testing.assert_close(kl, ref.detach())
    torch.testing.assert_close(mu.grad, 1 + 0.25 * gm)
    torch.testing.assert_close(lv.grad, 0.25 * gl)
    kl2 = add_diag_gaussian_kl_grad_(mu, lv, pm, pp, log_precision_sum=torch.log(pp).sum())
    torch.testing.assert_close(kl2, ref.detach())
    torch.testing.assert_close(lv.grad, 1.25 * gl)


def test_fused_kl_gradients_of_several_tensors_match_autograd() -> None:
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    mus = [torch.randn(s, dtype=DT, generator=g).requires_grad_() for s in shapes]
    lvs = [(torch.randn(s, dtype=DT, generator=g) - 2).requires_grad_() for s in shapes]
    pms = [torch.randn(s, dtype=DT, generator=g) for s in shapes]
    pps = [torch.rand(s, dtype=DT, generator=g) * 5 + 0.1 for s in shapes]
    ref = sum(diag_gaussian_kl(m, v, pm, pp) for m, v, pm, pp in zip(mus, lvs, pms, pps))
    grads = torch.autograd.grad(ref, [*mus, *lvs])
    mus[1].grad = torch.ones_like(mus[1])  # an existing data gradient is added to
    assert add_diag_gaussian_kl_grads_(mus, lvs, pms, pps, scale=0.5, value=False) is None  # gradient alone
    for p, gr, extra in zip([*mus, *lvs], grads, [0, 1, 0, 0, 0, 0]):
        torch.testing.assert_close(p.grad, extra + 0.5 * gr)
    kl = add_diag_gaussian_kl_grads_(mus, lvs, pms, pps, scale=0.5)
    torch.testing.assert_close(kl, ref.detach())
    for p, gr, extra in zip([*mus, *lvs], grads, [0, 1, 0, 0, 0, 0]):
        torch.testing.assert_close(p.grad, extra + gr)


def test_kl_monte_carlo_and_sample_moments(flat, mvn) -> None:
    q1, q2 = rand(4), rand(5)
    s = q1.sample(20000, generator=torch.Generator().manual_seed(0))
    assert s["b"].shape == (20000, 2, 2)
    x = torch.cat([s[n].reshape(20000, -1) for n in SHAPES], 1)
    mc = (mvn(q1).log_prob(x) - mvn(q2).log_prob(x)).mean()
    assert mc.item() == pytest.approx(q1.kl(q2).item(), rel=0.05)
    torch.testing.assert_close(x.mean(0), flat(q1.mean), atol=0.05, rtol=0)
    torch.testing.assert_close(x.var(0), flat(q1.variance), atol=0, rtol=0.05)


def test_quadratic_and_grad_proper_and_improper(flat) -> None:
    for q in (rand(6), rand(7, zero_frac=0.5)):
        theta = {n: torch.linspace(-1, 1, torch.Size(s).numel(), dtype=DT).reshape(s) for n, s in SHAPES.items()}
        th = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        q.quadratic(th).backward()
        grad = q.quadratic_grad(theta)
        for n in SHAPES:
            torch.testing.assert_close(th[n].grad, grad[n])
            torch.testing.assert_close(grad[n], q.precision[n] * theta[n] - q.eta[n])
    q = rand(8)
    assert q.quadratic(q.mean).item() == pytest.approx(0.0, abs=1e-14)
    v = flat(q.mean) + 1.0
    theta = {"a": v[:3], "b": v[3:].reshape(2, 2)}
    assert q.quadratic(theta).item() == pytest.approx(0.5 * flat(q.precision).sum().item(), rel=1e-12)
    site = rand(9, zero_frac=0.5)
    assert not site.is_proper()
    with pytest.raises(ValueError, match="kl needs a proper Gaussian but parameter '(a|b)' has precision <= 0"):
        site.kl(q)
    for attr in ("mean", "variance"):
        with pytest.raises(ValueError, match="proper"):
            getattr(site, attr)
    with pytest.raises(ValueError, match="proper"):
        site.sample()


finite = st.floats(-3, 3, allow_nan=False)
positive = st.floats(0.05, 20, allow_nan=False)


@st.composite
def gaussians(draw, zeros: bool = False) -> DiagGaussian:
    mean = {n: torch.tensor(draw(st.lists(finite, min_size=4, max_size=4)), dtype=DT)[: torch.Size(s).numel()]
            .reshape(s) for n, s in SHAPES.items()}
    vals = st.one_of(st.just(0.0), positive) if zeros else positive
    prec = {n: torch.tensor(draw(st.lists(vals, min_size=4, max_size=4)), dtype=DT)[: torch.Size(s).numel()]
            .reshape(s) for n, s in SHAPES.items()}
    return DiagGaussian.from_mean_precision(mean, prec)


@settings(max_examples=60, deadline=None)
@given(gaussians(), gaussians(zeros=True))
def test_property_product_then_division_is_identity(flat, q: DiagGaussian, s: DiagGaussian) -> None:
    back = (q * s) / s
    torch.testing.assert_close(flat(back.precision), flat(q.precision), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(back.mean), flat(q.mean), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(gaussians(), gaussians())
def test_property_kl(q: DiagGaussian, r: DiagGaussian) -> None:
    assert abs(q.kl(q).item()) < 1e-12
    assert q.kl(r).item() >= -1e-12


def test_constructors_and_structure(flat) -> None:
    m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)).to(DT)
    m[1].bias.requires_grad_(False)
    prior = DiagGaussian.isotropic(m, 4.0, mean="current")
    assert prior.names == ("0.weight", "0.bias", "1.weight") and len(prior) == 6 + 3 + 3
    torch.testing.assert_close(prior.mean["0.weight"], m[0].weight.detach())
    torch.testing.assert_close(prior.variance["0.bias"], torch.full((3,), 0.25, dtype=DT))
    z = DiagGaussian.zeros_like(m)
    assert float(z.precision["1.weight"].abs().sum()) == 0.0
    torch.testing.assert_close(flat((rand(0) * DiagGaussian.zeros_like(rand(0).eta)).eta), flat(rand(0).eta))
    mom = DiagGaussian.from_moments({"x": torch.ones(2, dtype=DT)}, {"x": torch.full((2,), 0.5, dtype=DT)})
    torch.testing.assert_close(mom.precision["x"], torch.full((2,), 2.0, dtype=DT))
    assert "0.bias" in prior and "1.bias" not in prior
    r = prior.restrict(["1.weight"])
    assert r.names == ("1.weight",)
    with pytest.raises(KeyError, match="'nope' is not in this Gaussian"):
        prior.restrict(["nope"])
    m.add_module("2", nn.Linear(1, 2).to(DT))
    ext = prior.extend(m, 4.0)
    assert ext.names[-2:] == ("2.weight", "2.bias")
    torch.testing.assert_close(ext.mean["2.weight"], m[2].weight.detach())
    torch.testing.assert_close(ext.mean["0.weight"], prior.mean["0.weight"])
    assert float(prior.extend(m, 0.0).precision["2.bias"].sum()) == 0.0
    assert prior.to(dtype=torch.float32).eta["0.bias"].dtype == torch.float32
    assert prior.num_floats() == 2 * len(prior)


def test_state_dict_roundtrip_and_mismatch(flat) -> None:
    q = rand(10)
    sd = q.state_dict()
    assert sd["kind"] == "diag"
    q2 = DiagGaussian.from_state_dict(sd)
    torch.testing.assert_close(flat(q2.eta), flat(q.eta))
    target = rand(11)
    target.load_state_dict(sd)
    torch.testing.assert_close(flat(target.mean), flat(q.mean))
    bad = {"kind": "diag", "eta": {"a": torch.zeros(4, dtype=DT), "b": torch.zeros(2, 2, dtype=DT)},
           "precision": {"a": torch.ones(4, dtype=DT), "b": torch.ones(2, 2, dtype=DT)}}
    with pytest.raises(ValueError, match=r"parameter 'a' has shape \(3,\) in self but \(4,\) in state"):
        target.load_state_dict(bad)
    with pytest.raises(ValueError, match="kind='kron'"):
        DiagGaussian.from_state_dict({"kind": "kron"})


def test_errors(flat) -> None:
    q = rand(12)
    other = DiagGaussian.from_mean_precision({"a": torch.zeros(3, dtype=DT), "c": torch.zeros(1, dtype=DT)},
                                             {"a": torch.ones(3, dtype=DT), "c": torch.ones(1, dtype=DT)})
    with pytest.raises(ValueError, match="parameter 'b' is in self but not in other"):
        q * other
    wrong = DiagGaussian.from_mean_precision({"a": torch.zeros(3, dtype=DT), "b": torch.zeros(4, dtype=DT)},
                                             {"a": torch.ones(3, dtype=DT), "b": torch.ones(4, dtype=DT)})
    with pytest.raises(ValueError, match=r"parameter 'b' has shape \(2, 2\) in self but \(4,\) in other"):
        q.kl(wrong)
    with pytest.raises(ValueError, match=r"precision\['x'\] has negative entries"):
        DiagGaussian({"x": torch.zeros(2)}, {"x": torch.tensor([1.0, -1.0])})
    with pytest.raises(ValueError, match=r"precision\['x'\] has dtype torch.float64"):
        DiagGaussian({"x": torch.zeros(2)}, {"x": torch.ones(2, dtype=DT)})
    with pytest.raises(ValueError, match=r"precision\['x'\] is on device meta"):
        DiagGaussian({"x": torch.zeros(2)}, {"x": torch.ones(2, device="meta")})
    with pytest.raises(ValueError, match=r"eta\['x'\] contains non-finite"):
        DiagGaussian({"x": torch.tensor([float("nan")])}, {"x": torch.ones(1)})
    with pytest.raises(ValueError, match="parameter 'a' would get precision <= 0"):
        q / q
    improper = q.divide(q, allow_improper=True)
    assert float(flat(improper.precision).abs().max()) == 0.0
    with pytest.raises(ValueError, match="parameter 'a' would get negative precision"):
        q.divide(q ** 2.0, allow_improper=True)
    with pytest.raises(ValueError, match="precision=0.0 is out of range"):
        DiagGaussian.isotropic({"x": torch.zeros(1)}, 0.0)
    with pytest.raises(ValueError, match="mean='ones' is not valid"):
        DiagGaussian.isotropic({"x": torch.zeros(1)}, 1.0, mean="ones")
    with pytest.raises(TypeError, match="params must be an nn.Module or a mapping"):
        DiagGaussian.zeros_like([torch.zeros(1)])
    with pytest.raises(TypeError, match="needs another DiagGaussian"):
        q * 2.0
    with pytest.raises(ValueError, match="variance\\['x'\\] has entries <= 0"):
        DiagGaussian.from_moments({"x": torch.zeros(1)}, {"x": torch.zeros(1)})
