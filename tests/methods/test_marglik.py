"""Prior precision by the Laplace evidence, against dense references (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kron import KronGaussian
from bayescl.methods.marglik import fit_prior_precision, log_evidence, with_prior_precision

DT = torch.float64
TAU0 = 1e-4


def _dense_evidence(H: torch.Tensor, sq: float, tau: float) -> float:
    """``-τ/2 ‖θ‖² + P/2 log τ - 1/2 log det(τ I + H)`` with a dense symmetric ``H``."""
    P = H.shape[0]
    return -0.5 * tau * sq + 0.5 * P * math.log(tau) - 0.5 * float(torch.logdet(tau * torch.eye(P, dtype=DT) + H))


def test_diag_evidence_matches_dense_and_the_fit_is_its_maximum():
    g = torch.Generator().manual_seed(0)
    mean = {"w": torch.randn(3, 4, generator=g, dtype=DT), "b": torch.randn(3, generator=g, dtype=DT)}
    H = {"w": 50 * torch.rand(3, 4, generator=g, dtype=DT), "b": torch.rand(3, generator=g, dtype=DT)}
    q = DiagGaussian.from_mean_precision(mean, {n: h + TAU0 for n, h in H.items()})
    Hd = torch.diag(torch.cat([H["w"].reshape(-1), H["b"]]))
    sq = float(sum((m**2).sum() for m in mean.values()))
    got = log_evidence(q, torch.tensor([0.1, 1.0, 10.0], dtype=DT), TAU0)
    for i, tau in enumerate((0.1, 1.0, 10.0)):
        assert float(got[i]) == pytest.approx(_dense_evidence(Hd, sq, tau), rel=1e-10)
    tau = fit_prior_precision(q, TAU0)
    best = _dense_evidence(Hd, sq, tau)
    for f in (0.9, 0.99, 1.01, 1.1):
        assert best >= _dense_evidence(Hd, sq, tau * f) - 1e-9
    q2 = with_prior_precision(q, TAU0, tau)
    torch.testing.assert_close(q2.precision["w"], H["w"] + tau)
    torch.testing.assert_close(q2.mean["b"], mean["b"])


def test_untouched_entries_do_not_move_the_fit():
    mean = {"w": torch.tensor([0.5, -0.2], dtype=DT), "head": torch.full((4,), 3.0, dtype=DT)}
    q = DiagGaussian.from_mean_precision(mean, {"w": torch.tensor([20.0, 5.0], dtype=DT) + TAU0,
                                                "head": torch.full((4,), TAU0, dtype=DT)})
    alone = DiagGaussian.from_mean_precision({"w": mean["w"]}, {"w": q.precision["w"]})
    assert fit_prior_precision(q, TAU0) == pytest.approx(fit_prior_precision(alone, TAU0), rel=1e-6)


def test_kron_evidence_matches_dense_logdet():
    torch.manual_seed(0)
    A0, G0 = torch.randn(4, 4, dtype=DT), torch.randn(3, 3, dtype=DT)
    A, G = A0 @ A0.T, G0 @ G0.T
    mean = {"w": torch.randn(3, 3, dtype=DT), "b": torch.randn(3, dtype=DT)}
    q = KronGaussian(mean, {"l": ("w", "b")}, {"l": [(A, G, 2.0)]}, {"w": TAU0, "b": TAU0})
    _, P = q.to_dense()
    H = P - TAU0 * torch.eye(P.shape[0], dtype=DT)
    sq = float(sum((m**2).sum() for m in mean.values()))
    for tau in (0.05, 2.0):
        assert float(log_evidence(q, tau, TAU0)[0]) == pytest.approx(_dense_evidence(H, sq, tau), rel=1e-9)
    tau = fit_prior_precision(q, TAU0)
    for f in (0.95, 1.05):
        assert _dense_evidence(H, sq, tau) >= _dense_evidence(H, sq, tau * f) - 1e-9
    q2 = with_prior_precision(q, TAU0, tau)
    _, P2 = q2.to_dense()
    torch.testing.assert_close(P2, H + tau * torch.eye(P.shape[0], dtype=DT))
    torch.testing.assert_close(q2.mean["w"], mean["w"])


def test_bad_input():
    q = DiagGaussian.from_mean_precision({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="prior_precision"):
        fit_prior_precision(q, 0.0)
    with pytest.raises(ValueError, match="new"):
        with_prior_precision(q, 1e-4, -1.0)
    with pytest.raises(TypeError, match="DiagGaussian or KronGaussian"):
        fit_prior_precision(object(), 1e-4)  # type: ignore[arg-type]


def test_kron_null_space_of_a_factor_does_not_move_the_fit():
    """Weights on an input that is always zero (a zero row and column of A) never get a gradient: whatever
    value they keep must not change the fitted τ."""
    torch.manual_seed(3)
    A0, G0 = torch.randn(4, 4, dtype=DT), torch.randn(3, 3, dtype=DT)
    A, G = A0 @ A0.T, G0 @ G0.T
    A[1, :] = 0
    A[:, 1] = 0
    mean = {"w": torch.randn(3, 3, dtype=DT), "b": torch.randn(3, dtype=DT)}
    fits = []
    for value in (0.0, 5.0):
        m = {"w": mean["w"].clone(), "b": mean["b"]}
        m["w"][:, 1] = value
        q = KronGaussian(m, {"l": ("w", "b")}, {"l": [(A, G, 2.0)]}, {"w": TAU0, "b": TAU0})
        fits.append(fit_prior_precision(q, TAU0))
    assert fits[0] == pytest.approx(fits[1], rel=1e-6)
