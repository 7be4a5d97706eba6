"""PosteriorServer: prior × sites in natural parameters (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kron import KronGaussian
from bayescl.gaussian.server import PosteriorServer, gaussian_from_state_dict, laplace_site

DT = torch.float64
SHAPES = {"w": (3, 2), "b": (3,)}


def site(seed: int, zero_frac: float = 0.3) -> DiagGaussian:
    g = torch.Generator().manual_seed(seed)
    mean = {n: torch.randn(s, generator=g, dtype=DT) for n, s in SHAPES.items()}
    prec = {n: torch.where(torch.rand(s, generator=g, dtype=DT) < zero_frac, 0.0,
                           3 * torch.rand(s, generator=g, dtype=DT)) for n, s in SHAPES.items()}
    return DiagGaussian.from_mean_precision(mean, prec)


def test_posterior_is_prior_times_sites_and_removal_is_exact(flat, prior) -> None:
    server = PosteriorServer(prior(SHAPES, 1.5))
    s0, s1, s2 = site(0), site(1), site(2)
    for i, s in enumerate((s0, s1, s2)):
        server.add(f"t{i}", s)
    assert server.names == ("t0", "t1", "t2") and len(server) == 3 and "t1" in server
    post = server.posterior()
    assert server.posterior() is post  # cached
    ref = prior(SHAPES, 1.5) * s0 * s1 * s2
    torch.testing.assert_close(flat(post.precision), flat(ref.precision), rtol=1e-14, atol=0)
    # the cavity is the posterior divided by the site
    cav = server.cavity("t1")
    div = post / s1
    torch.testing.assert_close(flat(cav.mean), flat(div.mean), rtol=1e-12, atol=1e-12)
    assert server.remove("t1") is s1
    without = prior(SHAPES, 1.5) * s0 * s2
    torch.testing.assert_close(flat(server.posterior().mean), flat(without.mean), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat(server.posterior().precision), flat(without.precision), rtol=1e-12, atol=0)
    assert [n for n in server] == ["t0", "t2"] and [n for n, _ in server.items()] == ["t0", "t2"]


def test_damped_update_interpolates_naturals(flat, prior) -> None:
    server = PosteriorServer(prior(SHAPES, 1.5), damping=0.25)
    old, new = site(3), site(4)
    server.update("t", old)  # unknown: starts from the empty site
    torch.testing.assert_close(flat(server["t"].precision), 0.25 * flat(old.precision))
    server.replace("t", old)
    server.update("t", new)
    torch.testing.assert_close(flat(server["t"].eta), 0.75 * flat(old.eta) + 0.25 * flat(new.eta))
    torch.testing.assert_close(flat(server["t"].precision), 0.75 * flat(old.precision) + 0.25 * flat(new.precision))
    server.damping = 1.0
    server.update("t", new)
    torch.testing.assert_close(flat(server.posterior().eta), flat((prior(SHAPES, 1.5) * new).eta))
    with pytest.raises(ValueError, match="damping=0 is out of range"):
        server.damping = 0


def test_errors(prior) -> None:
    server = PosteriorServer(prior(SHAPES, 1.5))
    server.add("a", site(0))
    with pytest.raises(KeyError, match="site 'a' exists already"):
        server.add("a", site(1))
    with pytest.raises(KeyError, match=r"site 'zz' is unknown; known sites: \['a'\]"):
        server.remove("zz")
    with pytest.raises(KeyError, match="site 'zz' is unknown"):
        server.cavity("zz")
    with pytest.raises(KeyError, match="site 'zz' is unknown"):
        server.replace("zz", site(1))
    bad = DiagGaussian.zeros_like({"w": torch.zeros(3, 2, dtype=DT)})
    with pytest.raises(ValueError, match="parameter 'b' is in self but not in site 'x'"):
        server.add("x", bad)
    with pytest.raises(TypeError, match="must be a DiagGaussian like the prior"):
        server.add("x", 1.0)
    with pytest.raises(TypeError, match="prior must be a DiagGaussian or KronGaussian"):
        PosteriorServer({"w": torch.zeros(1)})


def test_state_dict_roundtrip_and_extend_prior(flat, prior) -> None:
    server = PosteriorServer(prior(SHAPES, 1.5), damping=0.5)
    server.add("t0", site(5))
    server.add("t1", site(6))
    sd = server.state_dict()
    other = PosteriorServer(prior(SHAPES, 1.5))
    other.load_state_dict(sd)
    assert other.names == ("t0", "t1") and other.damping == 0.5
    torch.testing.assert_close(flat(other.posterior().mean), flat(server.posterior().mean))
    again = PosteriorServer.from_state_dict(sd)
    torch.testing.assert_close(flat(again.posterior().eta), flat(server.posterior().eta))
    assert isinstance(gaussian_from_state_dict(sd["prior"]), DiagGaussian)
    with pytest.raises(ValueError, match="kind='nope' is not valid"):
        gaussian_from_state_dict({"kind": "nope"})
    # a head appearing later: base prior in the prior, zero-precision entries in the sites
    head = {"head.w": torch.full((2, 2), 0.5, dtype=DT)}
    server.extend_prior(head, 1.5)
    assert float(server["t0"].precision["head.w"].abs().sum()) == 0.0
    post = server.posterior()
    torch.testing.assert_close(post.mean["head.w"], head["head.w"])
    torch.testing.assert_close(post.precision["head.w"], torch.full((2, 2), 1.5, dtype=DT))
    with pytest.raises(ValueError, match="parameter 'head.w' is in self but not in state prior"):
        server.load_state_dict(sd)


def test_kron_server_removal_cavity_and_damping(flat) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)).to(DT)
    p0 = KronGaussian.isotropic(model, 2.0)
    g = torch.Generator().manual_seed(0)

    def kfac_site(shift: float) -> KronGaussian:
        mean = {n: p.detach() + shift for n, p in model.named_parameters()}
        fac = {}
        for layer, (n_in, n_out) in {"0": (4, 2), "1": (3, 2)}.items():
            a, gg = torch.randn(n_in, 5, generator=g, dtype=DT), torch.randn(n_out, 4, generator=g, dtype=DT)
            fac[layer] = (a @ a.T, gg @ gg.T)
        return KronGaussian.from_factors(mean, fac, p0.layers)

    server = PosteriorServer(p0)
    s0, s1 = kfac_site(0.1), kfac_site(-0.2)
    server.add("t0", s0)
    server.add("t1", s1)
    assert server.posterior().num_terms == {"0": 2, "1": 2}
    cav = server.cavity("t0")
    div = server.posterior() / s0
    torch.testing.assert_close(flat(cav.mean), flat(div.mean), rtol=1e-10, atol=1e-12)
    server.remove("t0")
    torch.testing.assert_close(flat(server.posterior().mean), flat((p0 * s1).mean), rtol=1e-12, atol=1e-12)
    server.damping = 0.5
    server.update("t1", s0)
    assert server["t1"].num_terms == {"0": 2, "1": 2}
    assert sorted(t.scale for t in server["t1"].terms["0"]) == [0.5, 0.5]
    restored = PosteriorServer.from_state_dict(server.state_dict())
    torch.testing.assert_close(flat(restored.posterior().mean), flat(server.posterior().mean))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000), st.floats(0.0, 0.9))
def test_property_removing_an_added_site_is_identity(flat, prior, seed_a: int, seed_b: int, zero_frac: float) -> None:
    server = PosteriorServer(prior(SHAPES, 1.5))
    server.add("a", site(seed_a, zero_frac))
    before = server.posterior()
    server.add("b", site(seed_b, zero_frac))
    server.remove("b")
    after = server.posterior()
    torch.testing.assert_close(flat(after.eta), flat(before.eta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat(after.precision), flat(before.precision), rtol=1e-12, atol=1e-12)
    # and dividing the added site out of the posterior gives the same to rounding
    post = before * site(seed_b, zero_frac)
    torch.testing.assert_close(flat((post / site(seed_b, zero_frac)).mean), flat(before.mean), rtol=1e-9,
                               atol=1e-9)


def test_laplace_site_centres_the_product_on_the_given_mean():
    torch.manual_seed(0)
    shapes = {"w": (3, 4), "b": (3,)}
    cav = DiagGaussian.from_mean_precision({n: torch.randn(s, dtype=torch.float64) for n, s in shapes.items()},
                                           {n: torch.rand(s, dtype=torch.float64) + 0.5 for n, s in shapes.items()})
    curv_prec = {n: torch.rand(s, dtype=torch.float64) for n, s in shapes.items()}
    curv_prec["b"][0] = 0.0  # a direction the data says nothing about
    theta = {n: torch.randn(s, dtype=torch.float64) for n, s in shapes.items()}
    curv = DiagGaussian.from_mean_precision(theta, curv_prec)
    q = cav * laplace_site(cav, curv, theta)
    for n in shapes:
        torch.testing.assert_close(q.mean[n], theta[n])
        torch.testing.assert_close(q.precision[n], cav.precision[n] + curv_prec[n])


def test_signed_sites_multiply_roundtrip_and_guard_removal(flat, prior) -> None:
    """A VCL-style chain q0 -> q1 -> q2 where q2 is wider than q1 somewhere: the site q2/q1 is signed."""
    p0 = prior(SHAPES, 1.5)
    var = {"w": torch.tensor([[0.2, 0.5], [0.3, 0.1], [0.4, 0.4]], dtype=DT), "b": torch.full((3,), 0.25, dtype=DT)}
    mean = {n: torch.full(s, 0.3, dtype=DT) for n, s in SHAPES.items()}
    q1 = DiagGaussian.from_moments(mean, var)
    var2 = {n: v.clone() for n, v in var.items()}
    var2["w"][0, 0] = 0.6  # wider than q1 (0.2) but narrower than the prior (1/1.5)
    q2 = DiagGaussian.from_moments({n: m + 0.1 for n, m in mean.items()}, var2)
    with pytest.raises(ValueError, match="negative precision"):
        q2.divide(q1, allow_improper=True)
    t2 = q2.divide(q1, allow_negative=True)
    assert t2.is_signed and float(t2.precision["w"][0, 0]) < 0
    with pytest.raises(ValueError, match="signed=True"):
        DiagGaussian(t2.eta, t2.precision)
    server = PosteriorServer(p0)
    server.add("t1", q1.divide(p0, allow_improper=True))
    server.add("t2", t2)
    torch.testing.assert_close(flat(server.posterior().mean), flat(q2.mean))
    torch.testing.assert_close(flat(server.posterior().precision), flat(q2.precision))
    # the signed site survives a state_dict round trip
    again = PosteriorServer.from_state_dict(server.state_dict())
    torch.testing.assert_close(flat(again["t2"].precision), flat(t2.precision))
    # removing the last (signed) site is exact
    copy = PosteriorServer.from_state_dict(server.state_dict())
    copy.remove("t2")
    torch.testing.assert_close(flat(copy.posterior().precision), flat(q1.precision))
    # removing t1 would leave p0 · t2 with precision 1.5 + (1/0.6 − 1/0.2) < 0: refused, nothing changes
    with pytest.raises(ValueError, match="cannot remove site 't1'.*parameter 'w'.*The site is kept"):
        server.remove("t1")
    assert server.names == ("t1", "t2")
    torch.testing.assert_close(flat(server.posterior().precision), flat(q2.precision))
