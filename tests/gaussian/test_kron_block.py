"""The public per-layer block API of KronGaussian and the interface both Gaussian kinds share, against dense
references (float64, tiny layers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayescl.gaussian import DiagGaussian, KronGaussian, PriorGradient, check_gaussian
from bayescl.gaussian.kron_block import from_block, to_block
from bayescl.methods.predictive import check_posterior_names, glm_supported

DT = torch.float64


@pytest.fixture(scope="session")
def kron(psd):
    """``kron(n_terms, iso=True)``: a random KronGaussian with one layer "lin" (w, b) and one other parameter "s"."""

    def kron(n_terms: int, iso: bool = True) -> KronGaussian:
        g = torch.Generator().manual_seed(n_terms)
        mean = {"w": torch.randn(2, 3, generator=g, dtype=DT), "b": torch.randn(2, generator=g, dtype=DT),
                "s": torch.randn(4, generator=g, dtype=DT)}
        diag = {"w": torch.tensor(0.5, dtype=DT) if iso else 0.5 + torch.rand(2, 3, generator=g, dtype=DT),
                "b": torch.tensor(0.5, dtype=DT), "s": torch.tensor(2.0, dtype=DT)}
        terms = [(psd(4, g), psd(2, g), 1.0 + i) for i in range(n_terms)]
        return KronGaussian(mean, {"lin": ("w", "b")}, {"lin": terms}, diag)

    return kron


def test_block_round_trip_and_shape(kron) -> None:
    q = kron(1)
    mean = q.mean
    x = to_block(("w", "b"), mean)
    assert x.shape == (2, 4)
    back = from_block(("w", "b"), x, mean)
    torch.testing.assert_close(back["w"], mean["w"])
    torch.testing.assert_close(back["b"], mean["b"])


@pytest.mark.parametrize(("n_terms", "iso"), [(0, True), (1, True), (2, True), (1, False)])
def test_block_matvec_solve_factor_against_dense(kron, n_terms: int, iso: bool) -> None:
    blk = kron(n_terms, iso).block("lin")
    lam = blk.dense()
    x = torch.randn(2, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(blk.matvec(x).reshape(-1), lam @ x.reshape(-1))
    torch.testing.assert_close(blk.solve(x).reshape(-1), torch.linalg.solve(lam, x.reshape(-1)))
    f = blk.factor()
    torch.testing.assert_close(f.logdet(), torch.logdet(lam))
    torch.testing.assert_close(f.trace_with(blk), torch.tensor(8.0, dtype=DT))
    delta, a = torch.randn(3, 2, dtype=DT), torch.randn(3, 4, dtype=DT)
    j = (delta[:, :, None] * a[:, None, :]).reshape(3, -1)
    torch.testing.assert_close(f.outer_quadratic(delta, a), ((j @ torch.linalg.inv(lam)) * j).sum(-1))


def test_block_of_an_unknown_layer_is_named(kron) -> None:
    with pytest.raises(KeyError, match="'nope'"):
        kron(1).block("nope")


def test_both_kinds_share_the_interface(kron) -> None:
    q = kron(1)
    d = DiagGaussian.from_mean_precision(q.mean, {n: torch.full_like(t, 3.0) for n, t in q.mean.items()})
    assert d.layers == {} and d.blocks() == {}
    assert set(q.blocks()) == {"lin"}
    ep = q.elementwise_precision()
    assert ep["w"].shape == (2, 3) and float(ep["s"][0]) == 2.0
    h, sq = d.data_spectrum(1.0)
    torch.testing.assert_close(h, torch.full((len(d),), 2.0, dtype=DT))
    assert sq == pytest.approx(sum(float((t**2).sum()) for t in q.mean.values()))
    d2 = d.with_base_precision(1.0, 5.0)
    torch.testing.assert_close(d2.precision["w"], torch.full((2, 3), 7.0, dtype=DT))
    q2 = q.with_base_precision(0.5, 1.0)
    assert float(q2.diag["w"]) == 1.0 and float(q2.diag["s"]) == 2.5
    with pytest.raises(TypeError, match="posterior must be a DiagGaussian or KronGaussian"):
        check_gaussian(object())


def test_prior_gradient_equals_quadratic_grad_for_both_kinds(kron) -> None:
    q = kron(2, iso=False)
    params = {n: nn.Parameter(t + 0.1) for n, t in q.mean.items()}
    for g in (q, DiagGaussian.from_mean_precision(q.mean, {n: torch.ones_like(t) for n, t in q.mean.items()})):
        for p in params.values():
            p.grad = None
        PriorGradient(g, params).add_(params, 2.0)
        ref = g.quadratic_grad({n: p.detach() for n, p in params.items()})
        for n, p in params.items():
            torch.testing.assert_close(p.grad, 2.0 * ref[n])


def test_glm_supported_and_names() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    q = KronGaussian.isotropic(model, 1.0)
    assert glm_supported(model, q) and not glm_supported(model, None)
    assert glm_supported(model, DiagGaussian.isotropic(model, 1.0))
    conv = nn.Sequential(nn.Conv2d(1, 1, 2)).to(DT)
    assert not glm_supported(conv, KronGaussian.isotropic(conv, 1.0))
    assert set(check_posterior_names(model, q)) == {"0.weight", "0.bias"}
    with pytest.raises(ValueError, match="'x'"):
        check_posterior_names(model, DiagGaussian.isotropic({"x": torch.zeros(1)}, 1.0))
