"""KronGaussian against dense references (float64, tiny layers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

from bayescl.gaussian.kron import KronGaussian, KronTerm

DT = torch.float64


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2), nn.Linear(2, 2, bias=False)).to(DT)


LAYERS = {"0": ("0.weight", "0.bias"), "2": ("2.weight", None)}
NAMES = ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]


def vec(d: dict[str, torch.Tensor]) -> torch.Tensor:
    """Row-major vec of each block W̃ = [W, b], then the other parameters (the to_dense order)."""
    return torch.cat([torch.cat([d["0.weight"], d["0.bias"][:, None]], 1).reshape(-1),
                      d["2.weight"].reshape(-1), d["1.weight"], d["1.bias"]])


def unvec(v: torch.Tensor) -> dict[str, torch.Tensor]:
    b0 = v[:8].reshape(2, 4)
    return {"0.weight": b0[:, :3], "0.bias": b0[:, 3], "2.weight": v[8:12].reshape(2, 2),
            "1.weight": v[12:14], "1.bias": v[14:16]}


def random_mean(g: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {"0.weight": (2, 3), "0.bias": (2,), "1.weight": (2,), "1.bias": (2,), "2.weight": (2, 2)}
    return {n: torch.randn(s, generator=g, dtype=DT) for n, s in shapes.items()}


def dense(terms: dict, diag: dict) -> torch.Tensor:
    """Dense Λ = Σ s kron(G, A) + diag, built independently from the raw inputs."""
    d = vec({n: diag.get(n, torch.zeros(())).expand(s) for n, s in
             zip(NAMES, [(2, 3), (2,), (2,), (2,), (2, 2)], strict=True)})
    blocks = []
    for layer, size in (("0", 8), ("2", 4)):
        blk = torch.zeros(size, size, dtype=DT)
        for A, G, *s in terms.get(layer, []):
            blk = blk + (s[0] if s else 1.0) * torch.kron(G, A)
        blocks.append(blk)
    blocks.append(torch.zeros(4, 4, dtype=DT))
    return torch.block_diag(*blocks) + torch.diag(d)


@pytest.fixture(scope="session")
def make(psd):
    """``make(seed, n_terms=1, iso=True, delta=0.5)``: a random KronGaussian on LAYERS, its mean and its dense precision."""

    def make(seed: int, n_terms: int = 1, iso: bool = True, delta: float = 0.5):
        g = torch.Generator().manual_seed(seed)
        mean = random_mean(g)
        terms = {"0": [(psd(4, g), psd(2, g), 0.5 + i) for i in range(n_terms)],
                 "2": [(psd(2, g), psd(2, g), 1.0 + i) for i in range(n_terms)]}
        if iso:
            diag = {n: torch.tensor(delta, dtype=DT) for n in NAMES}
        else:
            diag = {n: delta + torch.rand(mean[n].shape, generator=g, dtype=DT) for n in NAMES}
        return KronGaussian(mean, LAYERS, terms, diag), mean, dense(terms, diag)

    return make


def test_quadratic_and_grad_match_dense_sum_of_kron(make) -> None:
    q, mean, lam = make(0, n_terms=3, iso=False)
    theta = {n: t + 1.0 for n, t in mean.items()}
    th = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    v = vec(theta) - vec(mean)
    quad = q.quadratic(th)
    assert quad.item() == pytest.approx(0.5 * (v @ lam @ v).item(), rel=1e-12)
    quad.backward()
    ref = unvec(lam @ v)
    grad = q.quadratic_grad(theta)
    for n in NAMES:
        torch.testing.assert_close(grad[n], ref[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(th[n].grad, ref[n], rtol=1e-10, atol=1e-12)
    _, lam2 = q.to_dense()
    torch.testing.assert_close(lam2, lam)


@pytest.mark.parametrize("n_terms,iso", [(1, True), (2, True), (1, False)])
def test_product_mean_kl_logprob_against_dense(make, n_terms: int, iso: bool) -> None:
    q1, m1, l1 = make(1, n_terms, iso)
    q2, m2, l2 = make(2, n_terms, iso, delta=0.3)
    prod = q1 * q2
    mu = torch.linalg.solve(l1 + l2, l1 @ vec(m1) + l2 @ vec(m2))
    torch.testing.assert_close(vec(prod.mean), mu, rtol=1e-9, atol=1e-10)
    assert prod.num_terms == {"0": 2 * n_terms, "2": 2 * n_terms}
    p1, p2 = MultivariateNormal(vec(m1), precision_matrix=l1), MultivariateNormal(vec(m2), precision_matrix=l2)
    assert q1.kl(q2).item() == pytest.approx(kl_divergence(p1, p2).item(), rel=1e-9)
    theta = {n: t * 0.7 for n, t in m2.items()}
    assert q1.log_prob(theta).item() == pytest.approx(p1.log_prob(vec(theta)).item(), rel=1e-10)
    assert q1.kl(q1).abs().item() < 1e-10


def test_cg_path_matches_dense_solve(make, monkeypatch: pytest.MonkeyPatch) -> None:
    q1, m1, l1 = make(3, 2, iso=False)
    q2, m2, l2 = make(4, 1, iso=False)
    monkeypatch.setattr(KronGaussian, "DENSE_LIMIT", 0)
    mu = torch.linalg.solve(l1 + l2, l1 @ vec(m1) + l2 @ vec(m2))
    torch.testing.assert_close(vec((q1 * q2).mean), mu, rtol=1e-8, atol=1e-9)


def test_large_block_kl_uses_merged_approximation(make, monkeypatch: pytest.MonkeyPatch) -> None:
    q1, _, _ = make(5, 2)
    q2, _, _ = make(6, 1)
    exact = q1.kl(q2)
    monkeypatch.setattr(KronGaussian, "DENSE_LIMIT", 0)
    approx = q1.kl(q2)
    # documented approximation: the merged pair, which is what the exact KL of q1.merge() gives
    merged = KronGaussian(q1.mean, q1.layers, q1.merge().terms, q1.diag)
    monkeypatch.setattr(KronGaussian, "DENSE_LIMIT", 2000)
    assert approx.item() == pytest.approx(merged.kl(q2).item(), rel=1e-9)
    assert approx.item() == pytest.approx(exact.item(), rel=0.5)


@pytest.mark.parametrize("n_terms", [1, 2])
def test_sample_moments(make, n_terms: int) -> None:
    q, m, lam = make(7, n_terms)
    s = q.sample(40000, generator=torch.Generator().manual_seed(0))
    assert s["0.weight"].shape == (40000, 2, 3)
    v = torch.stack([vec({n: s[n][i] for n in NAMES}) for i in range(0, 40000, 8)])
    torch.testing.assert_close(v.mean(0), vec(m), atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(v.T), torch.linalg.inv(lam), atol=0.1, rtol=0.1)
    assert q.sample()["1.bias"].shape == (2,)


def test_kl_monte_carlo(make) -> None:
    q1, _, _ = make(8, 1)
    q2, _, _ = make(9, 2)
    s = q1.sample(4000, generator=torch.Generator().manual_seed(1))
    lp = torch.stack([q1.log_prob({n: s[n][i] for n in NAMES}) - q2.log_prob({n: s[n][i] for n in NAMES})
                      for i in range(4000)])
    assert lp.mean().item() == pytest.approx(q1.kl(q2).item(), rel=0.1)


def test_merge_exact_with_shared_factor_and_optimal_otherwise(psd) -> None:
    g = torch.Generator().manual_seed(10)
    A, mean = psd(4, g), random_mean(g)
    G1, G2 = psd(2, g), psd(2, g)
    q = KronGaussian(mean, LAYERS, {"0": [(A, G1, 1.0), (A, G2, 2.0)]}, {n: 1.0 for n in NAMES})
    merged = q.merge()
    assert merged.num_terms["0"] == 1
    torch.testing.assert_close(merged.to_dense()[1], q.to_dense()[1])
    # two unrelated terms: the error equals the optimum sqrt(|R|² − σ1²) of the rearranged sum
    A1, A2 = psd(4, g), psd(4, g)
    ts = [KronTerm(A1, G1, 1.0), KronTerm(A2, G2, 3.0)]
    q = KronGaussian(mean, LAYERS, {"0": ts}, {n: 1.0 for n in NAMES})
    full = sum(t.scale * torch.kron(t.G, t.A) for t in ts)
    t = q.merge().terms["0"][0]
    err = (full - t.scale * torch.kron(t.G, t.A)).norm()
    r = sum(t.scale * torch.outer(t.G.reshape(-1), t.A.reshape(-1)) for t in ts)
    sv = torch.linalg.svdvals(r)
    assert err.item() == pytest.approx(((sv[1:] ** 2).sum().sqrt()).item(), rel=1e-6)
    naive = torch.kron(G1 + 3 * G2, A1 + A2)  # the laplace-torch trap, much worse
    assert err < (full - naive).norm()
    assert torch.linalg.eigvalsh(t.A).min() > -1e-12 and torch.linalg.eigvalsh(t.G).min() > -1e-12


def test_division_removes_exactly_the_site_terms(make) -> None:
    prior = KronGaussian.isotropic(model(), 2.0, mean="current")
    q, _, _ = make(11, 1)
    site = KronGaussian(q.mean, LAYERS, q.terms, None)
    post = prior * site * site
    back = (post / site) / site
    assert back.num_terms == {"0": 0, "2": 0}
    for n in NAMES:
        torch.testing.assert_close(back.mean[n], prior.mean[n], rtol=1e-9, atol=1e-10)
    other, _, _ = make(12, 1)
    with pytest.raises(ValueError, match="term .* of the divisor is not held"):
        post / other
    assert (post / site).num_terms == {"0": 1, "2": 1}
    tempered = site.temper(0.5)
    assert tempered.terms["0"][0].scale == pytest.approx(0.25)
    torch.testing.assert_close(tempered.mean["0.weight"], site.mean["0.weight"])


def test_from_factors_isotropic_and_structure(psd) -> None:
    m = model()
    prior = KronGaussian.isotropic(m, 3.0)
    assert prior.layers == LAYERS and prior.names == tuple(NAMES)
    g = torch.Generator().manual_seed(0)
    mean = {n: p.detach() for n, p in m.named_parameters()}
    site = KronGaussian.from_factors(mean, {"0": (psd(4, g), psd(2, g))}, prior.layers)
    assert site.num_terms == {"0": 1, "2": 0} and len(site) == 16
    assert site.num_floats() == 16 + 5 + 16 + 4 + 16
    with pytest.raises(ValueError, match="found .*BatchNorm1d"):
        KronGaussian.isotropic(nn.BatchNorm1d(3), 1.0)
    with pytest.raises(ValueError, match=r"factors A \(3, 3\)"):
        KronGaussian.from_factors(mean, {"0": (torch.eye(3, dtype=DT), torch.eye(2, dtype=DT))}, prior.layers)
    with pytest.raises(KeyError, match="'9'"):
        KronGaussian.from_factors(mean, {"9": (torch.eye(4, dtype=DT), torch.eye(2, dtype=DT))}, prior.layers)
    torch.testing.assert_close(site.mean["0.weight"], mean["0.weight"])  # the stored mean of a site
    with pytest.raises(ValueError, match="parameter '1.weight' has zero precision"):
        site.temper(0.0).mean  # noqa: B018
    proper_elsewhere = {n: 1.0 for n in ("1.weight", "1.bias")}
    s2 = KronGaussian.from_factors(mean, {"0": (psd(4, g), psd(2, g))}, prior.layers, proper_elsewhere)
    with pytest.raises(ValueError, match="layer '2' has a singular precision"):
        (s2 * s2).mean  # noqa: B018
    conv = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(12, 2)).to(DT)
    qc = KronGaussian.isotropic(conv, 1.0, mean="current")
    assert qc.layers == {"0": ("0.weight", "0.bias"), "2": ("2.weight", "2.bias")}
    qc2 = qc * KronGaussian.from_factors(qc.mean, {"0": (psd(9, g), psd(3, g))}, qc.layers)
    assert qc2.mean["0.weight"].shape == (3, 2, 2, 2)


def test_extend_restrict_state_dict(make) -> None:
    m = model()
    prior = KronGaussian.isotropic(m, 2.0)
    m.add_module("3", nn.Linear(2, 4).to(DT))
    ext = prior.extend(m, 2.0)
    assert "3.weight" in ext and ext.layers["3"] == ("3.weight", "3.bias")
    torch.testing.assert_close(ext.mean["3.weight"], m[3].weight.detach())
    assert ext.kl(KronGaussian.isotropic(m, 2.0, mean="current")).item() > 0
    r = ext.restrict(["0.weight", "0.bias"])
    assert r.layers == {"0": LAYERS["0"]}
    with pytest.raises(ValueError, match="split layer '0'"):
        ext.restrict(["0.weight"])
    q, _, _ = make(13, 2)
    sd = q.state_dict()
    assert sd["kind"] == "kron"
    q2 = KronGaussian.from_state_dict(sd)
    torch.testing.assert_close(vec(q2.mean), vec(q.mean))
    with pytest.raises(ValueError, match="parameter '3.weight' is in state"):
        prior.load_state_dict(ext.state_dict())
    prior.load_state_dict(KronGaussian.isotropic(model(), 5.0).state_dict())
    assert float(prior.diag["0.weight"]) == 5.0
    assert q.to(dtype=torch.float32).mean["0.weight"].dtype == torch.float32


def test_mismatch_errors(make) -> None:
    q, mean, _ = make(14, 1)
    other = KronGaussian({**mean, "extra": torch.zeros(2, dtype=DT)}, LAYERS, None, {n: 1.0 for n in NAMES})
    with pytest.raises(ValueError, match="parameter 'extra' is in other but not in self"):
        q * other
    with pytest.raises(TypeError, match="needs another KronGaussian"):
        q.kl(1.0)
    with pytest.raises(ValueError, match=r"diag\['1.bias'\] has negative"):
        KronGaussian(mean, LAYERS, None, {"1.bias": -1.0})
    with pytest.raises(ValueError, match="dtype"):
        KronGaussian({**mean, "x": torch.zeros(1, dtype=torch.float32)}, LAYERS)
    with pytest.raises(ValueError, match="alpha=-1"):
        q.temper(-1)


def _one_term_layer(seed: int):
    """A 4x5 layer with bias, one term ``2 (G ⊗ A)`` and isotropic 0.5: ``(A, G, mean, q, theta)``."""
    torch.manual_seed(seed)
    A0 = torch.randn(6, 6, dtype=torch.float64)
    G0 = torch.randn(4, 4, dtype=torch.float64)
    A, G = A0 @ A0.T, G0 @ G0.T
    mean = {"w": torch.randn(4, 5, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    q = KronGaussian(mean, {"l": ("w", "b")}, {"l": [(A, G, 2.0)]}, {"w": 0.5, "b": 0.5})
    theta = {"w": torch.randn(4, 5, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    return A, G, mean, q, theta


def test_low_rank_factors_truncate_exactly_and_full_rank_is_identity():
    A, G, mean, q, theta = _one_term_layer(0)
    full = q.low_rank(10).quadratic_grad(theta)
    for n, g in q.quadratic_grad(theta).items():
        torch.testing.assert_close(full[n], g)
    # rank 2: the dense reference with both factors truncated to their top-2 eigenpairs
    def trunc(M, r):
        w, V = torch.linalg.eigh(M)
        return (V[:, -r:] * w[-r:]) @ V[:, -r:].T
    lr = q.low_rank(2).with_mean(mean)
    Wt = torch.cat([theta["w"] - mean["w"], (theta["b"] - mean["b"])[:, None]], 1)
    dense = 2.0 * trunc(G, 2) @ Wt @ trunc(A, 2) + 0.5 * Wt
    got = lr.quadratic_grad(theta)
    torch.testing.assert_close(got["w"], dense[:, :5])
    torch.testing.assert_close(got["b"], dense[:, 5])
    assert lr.terms["l"][0].UA.shape == (6, 2)
    back = KronGaussian.from_state_dict(lr.state_dict()).quadratic_grad(theta)
    torch.testing.assert_close(back["w"], got["w"])


def test_low_rank_with_kept_diagonal_matches_dense_reference():
    A, G, mean, q, theta = _one_term_layer(1)

    def trunc_diag(M, r):  # top-r eigenpairs plus the diagonal of the rest
        w, V = torch.linalg.eigh(M)
        low = (V[:, -r:] * w[-r:]) @ V[:, -r:].T
        return low + torch.diag(torch.diagonal(M - low).clamp_min(0))

    lr = q.low_rank(2, keep_diagonal=True).with_mean(mean)
    Ar, Gr = trunc_diag(A, 2), trunc_diag(G, 2)
    torch.testing.assert_close(torch.diagonal(Ar), torch.diagonal(A))  # every weight keeps its own curvature
    t = lr.terms["l"][0]
    torch.testing.assert_close(t.A, Ar)
    torch.testing.assert_close(t.G, Gr)
    Wt = torch.cat([theta["w"] - mean["w"], (theta["b"] - mean["b"])[:, None]], 1)
    dense = 2.0 * Gr @ Wt @ Ar + 0.5 * Wt
    got = lr.quadratic_grad(theta)
    torch.testing.assert_close(got["w"], dense[:, :5])
    torch.testing.assert_close(got["b"], dense[:, 5])
    # the dense precision agrees with the factored apply, and the factors survive a state_dict round trip
    names, P = lr.to_dense()
    assert names == ["l"]
    torch.testing.assert_close(P @ Wt.reshape(-1), dense.reshape(-1))
    back = KronGaussian.from_state_dict(lr.state_dict())
    assert back.terms["l"][0].dA is not None
    for n, g in back.quadratic_grad(theta).items():
        torch.testing.assert_close(g, got[n])


def test_dense_factor_clips_float32_rounding_of_rank_deficient_factors() -> None:
    """A 2-way head's G is rank one; in float32 its zero eigenvalue comes out at about -1e-6 of the largest, and
    times A's eigenvalues that outweighs a base prior of 1e-4. The dense factor (two terms: no eigen form) must
    factorise the PSD-clipped precision (as the eigen form clips), not call the site improper."""
    from bayescl.gaussian.kron_block import KronBlock

    g = torch.Generator().manual_seed(0)
    v = torch.tensor([1.0, -1.0]) / 2**0.5
    terms = []
    for s in (1.4, 153.0):
        x = torch.randn(5, 6, generator=g, dtype=torch.float64)
        A = (x.T @ x).float()
        G = (s * torch.outer(v, v)).float() - 4e-6 * torch.eye(2)  # float32 rounding: slightly indefinite
        terms.append(KronTerm(A=A, G=G))
    block = KronBlock("head", ("head.weight", None), torch.full((2, 6), 1e-4), terms)
    assert float(torch.linalg.eigvalsh(block.exact(torch.float64).dense()).min()) < 0  # indefinite as stored
    f = block.factor()
    assert f.chol is not None and f.chol.dtype == torch.float32

    def clip(m):
        w, u = torch.linalg.eigh(m.double())
        return (u * w.clamp_min(0)) @ u.T

    ref = torch.diag(torch.full((12,), 1e-4, dtype=torch.float64))
    for t in terms:
        ref = ref + torch.kron(clip(t.G), clip(t.A))
    torch.testing.assert_close(f.chol.double() @ f.chol.double().T, ref, rtol=1e-5, atol=1e-6)
    r = torch.randn(2, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(f.solve(r.float()).double(), torch.linalg.solve(ref, r.reshape(-1)).reshape(2, 6),
                               rtol=5e-2, atol=0.0)


@pytest.mark.parametrize("n_terms,iso", [(1, True), (3, False)])
def test_precision_diagonal_and_mean_precision_match_dense(make, n_terms: int, iso: bool) -> None:
    from bayescl.gaussian import DiagGaussian, mean_precision

    q, _, lam = make(3, n_terms, iso)
    diag = q.precision_diagonal()
    torch.testing.assert_close(vec(diag), torch.diagonal(lam), rtol=1e-12, atol=1e-12)
    assert mean_precision(q) == pytest.approx(torch.diagonal(lam).mean().item(), rel=1e-12)
    # entries with zero precision (weights a task never touched) are left out of the mean
    d = DiagGaussian.from_mean_precision({"a": torch.zeros(4, dtype=DT)},
                                         {"a": torch.tensor([0.0, 2.0, 0.0, 4.0], dtype=DT)})
    assert mean_precision(d) == pytest.approx(3.0)
    assert mean_precision(DiagGaussian.zeros_like({"a": torch.zeros(3, dtype=DT)})) == 0.0


def test_mean_positive_averages_the_positive_entries_only() -> None:
    """The strategy's normalising factor: positive entries of several tensors, zeros (untouched weights) left out;
    0.0 when nothing is positive (a zero curvature stays zero rather than dividing by zero)."""
    from bayescl.gaussian.kinds import mean_positive

    assert mean_positive([torch.tensor([0.0, 2.0, 4.0]), torch.tensor([[0.0, 6.0]])]) == pytest.approx(4.0)
    assert mean_positive([torch.zeros(3), torch.zeros(2, 2)]) == 0.0
    assert mean_positive([]) == 0.0


def test_normalizing_factor_gives_one_per_example_per_touched_weight() -> None:
    """N / mean of the positive entries: a curvature summed over N examples, times it, has mean N on the weights it
    touches; 0.0 (not a division by zero) when it touches none."""
    from bayescl.gaussian import normalizing_factor

    s = [torch.tensor([0.0, 2.0, 4.0]), torch.tensor([[0.0, 6.0]])]  # mean of the positive entries: 4
    f = normalizing_factor(s, 10)
    assert f == pytest.approx(2.5)
    scaled = torch.cat([(t * f).flatten() for t in s])
    assert float(scaled[scaled > 0].mean()) == pytest.approx(10.0)
    assert normalizing_factor([torch.zeros(3)], 10) == 0.0
