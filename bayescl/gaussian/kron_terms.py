"""Kronecker terms ``s (G ⊗ A)`` of a :class:`bayescl.gaussian.kron.KronGaussian`: the term, its low-rank
truncation and the nearest-Kronecker-pair merge of a sum of terms (Van Loan & Pitsianis 1993). Pure torch."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

import torch
from torch import Tensor


def symmetric(M: Tensor) -> Tensor:
    """``(M + Mᵀ)/2``, exactly symmetric: a product ``Xᵀ X`` accumulated in float32 is symmetric only up to rounding,
    and an eigendecomposition reads one triangle while a matrix product reads both."""
    return 0.5 * (M + M.mT)


@dataclass(frozen=True)
class KronTerm:
    """One term ``scale · (G ⊗ A)``; terms with the same ``tag`` share their factors."""

    A: Tensor
    G: Tensor
    scale: float = 1.0
    tag: str = ""
    #: optional square-root factors with ``A = UA UAᵀ`` / ``G = UG UGᵀ`` (low rank: see ``KronGaussian.low_rank``)
    UA: Tensor | None = None
    UG: Tensor | None = None
    #: optional diagonals kept beside the low-rank factors: ``A = UA UAᵀ + diag(dA)`` (``dG`` likewise)
    dA: Tensor | None = None
    dG: Tensor | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KronTerm:
        """The same term (same tag) with every tensor moved to ``device`` / cast to ``dtype``."""
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, **{f: mv(getattr(self, f)) for f in ("A", "G", "UA", "UG", "dA", "dG")})

    def exact(self, dtype: torch.dtype) -> KronTerm:
        """The term cast to ``dtype`` (float64 for the mean), with the dense form of a low-rank factor rebuilt
        there, ``A = sym(UA UAᵀ) (+ diag(dA))``, so that it and :meth:`apply` (through ``UA``) are one matrix to
        ``dtype``'s rounding."""
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        def dense(M: Tensor, U: Tensor | None, d: Tensor | None) -> Tensor:
            if U is None:
                return M.to(dtype)
            low = symmetric(U @ U.T)
            return low if d is None else low + torch.diag(d)

        UA, UG, dA, dG = cast(self.UA), cast(self.UG), cast(self.dA), cast(self.dG)
        return replace(self, A=dense(self.A, UA, dA), G=dense(self.G, UG, dG), UA=UA, UG=UG, dA=dA, dG=dG)

    def apply(self, x: Tensor) -> Tensor:
        """``G x A`` for a block ``x`` (``out × p``), through the low-rank factors when present.

        With both factors purely low rank the ``r × r`` core ``U_Gᵀ x U_A`` is formed first (``2·out·p·r``
        multiply-adds instead of ``4·out·p·r``); a kept diagonal adds ``out·p`` per factor."""
        if self.UG is not None and self.UA is not None and self.dG is None and self.dA is None:
            return self.UG @ ((self.UG.T @ x) @ self.UA) @ self.UA.T
        if self.UG is None:
            gx = self.G @ x
        else:
            gx = self.UG @ (self.UG.T @ x)
            if self.dG is not None:
                gx = gx.addcmul_(self.dG.unsqueeze(1), x)
        if self.UA is None:
            return gx @ self.A
        out = (gx @ self.UA) @ self.UA.T
        return out if self.dA is None else out.addcmul_(gx, self.dA.unsqueeze(0))


def low_rank_factor(M: Tensor, rank: int, keep_diagonal: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(M_r, U, d)`` with ``M_r = U Uᵀ`` the best rank-``rank`` PSD approximation of ``M`` (top eigenpairs),
    or with ``keep_diagonal`` ``M_r = U Uᵀ + diag(d)``, ``d = diag(M − U Uᵀ) >= 0`` (the residual's diagonal, so
    ``M_r`` has ``M``'s diagonal); ``(M, None, None)`` when ``rank >= M.shape[0]``."""
    if rank >= M.shape[0]:
        return M, None, None
    w, V = torch.linalg.eigh(M)
    U = V[:, -rank:] * w[-rank:].clamp_min(0).sqrt()
    low = symmetric(U @ U.T)
    if not keep_diagonal:
        return low, U, None
    d = (torch.diagonal(M) - torch.diagonal(low)).clamp_min(0)
    return low + torch.diag(d), U, d


def new_tag() -> str:
    """A fresh random tag (terms with the same tag share their factors)."""
    return uuid.uuid4().hex


def merge_terms(ts: list[KronTerm], iters: int = 100) -> KronTerm | None:
    """Nearest Kronecker pair (Frobenius) to ``Σ s_i G_i ⊗ A_i`` by power iteration on the Gram matrices.

    Zero terms (a layer the data never reached: ``G = 0``) are dropped first; ``None`` when all are zero.
    """
    ts = [t for t in ts if t.scale > 0 and bool(t.A.abs().max() > 0) and bool(t.G.abs().max() > 0)]
    if not ts:
        return None
    if len(ts) == 1:
        return ts[0]
    tiny = torch.finfo(ts[0].A.dtype).tiny
    s = torch.tensor([t.scale for t in ts], dtype=ts[0].A.dtype, device=ts[0].A.device)
    A = torch.stack([t.A for t in ts])
    G = torch.stack([t.G for t in ts])
    ka = torch.einsum("iab,jab->ij", A, A)
    kg = torch.einsum("iab,jab->ij", G, G)
    alpha = s.clone()
    for _ in range(iters):
        gamma = s * (ka @ alpha)
        gamma = gamma / gamma.norm().clamp_min(tiny)
        alpha_new = s * (kg @ gamma)
        alpha_new = alpha_new / alpha_new.norm().clamp_min(tiny)
        if torch.allclose(alpha_new, alpha, rtol=0, atol=1e-14):
            alpha = alpha_new
            break
        alpha = alpha_new
    gamma = s * (ka @ alpha)
    # optimal scale c for c·(Σγ G)⊗(Σα A): <M, g aᵀ> / (|g|² |a|²)
    num = gamma @ kg @ (s * (ka @ alpha))
    c = num / ((gamma @ kg @ gamma) * (alpha @ ka @ alpha))
    a_m, g_m = torch.einsum("i,iab->ab", alpha, A), torch.einsum("i,iab->ab", gamma, G)
    na, ng = a_m.norm(), g_m.norm()  # balance: unit-norm factors, size in the scale
    return KronTerm(a_m / na, g_m / ng, float(c * na * ng), new_tag())
