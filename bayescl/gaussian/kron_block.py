r"""One layer's block of a :class:`~bayescl.gaussian.kron.KronGaussian`: the public per-layer API.

A ``Linear`` / ``Conv2d`` layer with weight ``W`` (``out × in…``) and bias ``b`` is the block
``W̃ = [W.reshape(out, -1), b]`` (``out × p``, the bias is the last input column; :func:`to_block`,
:func:`from_block`). Its precision

.. math::

    \Lambda = \operatorname{diag}(D) + \textstyle\sum_i s_i\, (G_i \otimes A_i),\qquad
    \Lambda\,\mathrm{vec}(\tilde W) \leftrightarrow D \odot \tilde W + \textstyle\sum_i s_i\, G_i \tilde W A_i

(``vec`` row-major) is a :class:`KronBlock`; :meth:`KronBlock.factor` factorises it as a :class:`BlockFactor`:

* the eigen form ``Λ = (U_G ⊗ U_A) diag(ℓ) (U_G ⊗ U_A)ᵀ`` with ``ℓ = δ + s g aᵀ`` when the block has at most one
  term and an isotropic ``D = δ`` (exact);
* the dense Cholesky factor when the block has at most ``dense_limit`` entries (exact);
* with ``approx``, the eigen form of the terms merged into one pair and ``D`` replaced by its mean (otherwise
  ``None``: :meth:`KronBlock.solve` then uses MINRES, preconditioned with that approximation).

:meth:`KronBlock.solve` works in float64 whatever the factors' dtype (see its docstring).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from bayescl.gaussian.kron_terms import KronTerm, merge_terms

#: a layer's ``(weight name, bias name or None)``
LayerSpec = tuple[str, str | None]


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the natural mean ``η`` and of the mean solve: float64 (float32 on Apple's MPS, which has no
    float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def widen(t: Tensor) -> Tensor:
    """``t`` in :func:`wide_dtype` (the same tensor when it is already)."""
    return t.to(wide_dtype(t.device))


def block_shape(spec: LayerSpec, tensors: Mapping[str, Tensor]) -> tuple[int, int]:
    """``(out, p)`` of the layer's block ``W̃`` (``p`` counts the bias column)."""
    w, b = spec
    return tensors[w].shape[0], tensors[w][0].numel() + (b is not None)


def to_block(spec: LayerSpec, tensors: Mapping[str, Tensor]) -> Tensor:
    """The block ``W̃ = [W.reshape(out, -1), b]`` of one layer from named tensors."""
    w, b = spec
    wt = tensors[w].reshape(tensors[w].shape[0], -1)
    return wt if b is None else torch.cat([wt, tensors[b].reshape(-1, 1)], dim=1)


def from_block(spec: LayerSpec, x: Tensor, shapes: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The named tensors of a block ``x`` (``(..., out, p)``, leading dimensions kept), shaped like ``shapes``."""
    w, b = spec
    out = {w: x[..., : shapes[w][0].numel()].reshape(x.shape[:-2] + tuple(shapes[w].shape))}
    if b is not None:
        out[b] = x[..., -1]
    return out


def apply_terms(terms: Iterable[KronTerm], x: Tensor) -> Tensor | None:
    """``Σ_i s_i G_i x A_i`` for a block ``x`` (``None`` when there is no term)."""
    terms = list(terms)
    return sum(t.scale * t.apply(x) for t in terms) if terms else None


@dataclass
class BlockFactor:
    """A factorised block precision: eigen form ``(U_G ⊗ U_A) diag(lam) (U_G ⊗ U_A)ᵀ`` (``U = None`` is ``I``;
    ``lam`` has the block's shape ``(out, p)``) or dense (``chol``, the lower Cholesky factor of ``Λ``)."""

    lam: Tensor | None = None
    ug: Tensor | None = None
    ua: Tensor | None = None
    chol: Tensor | None = None

    def logdet(self) -> Tensor:
        """``log det Λ``."""
        if self.chol is not None:
            return 2.0 * torch.log(torch.diagonal(self.chol)).sum()
        return torch.log(self.lam).sum()

    def cov_diag(self) -> Tensor:
        """Diagonal of ``Λ⁻¹`` (block shape for the eigen form, flat for dense)."""
        if self.chol is not None:
            return torch.diagonal(torch.cholesky_inverse(self.chol))
        inv = 1.0 / self.lam
        if self.ug is None:
            return inv
        return (self.ug**2) @ inv @ (self.ua**2).T

    def rot(self, x: Tensor, inverse: bool = False) -> Tensor:
        """A block into the eigenbasis, ``U_Gᵀ x U_A`` (``inverse``: back, ``U_G x U_Aᵀ``)."""
        if self.ug is None:
            return x
        if inverse:
            return self.ug @ x @ self.ua.T
        return self.ug.T @ x @ self.ua

    def solve(self, r: Tensor) -> Tensor:
        """``Λ⁻¹ r`` for a block ``r``."""
        if self.chol is not None:
            return torch.cholesky_solve(r.reshape(-1, 1), self.chol).reshape(r.shape)
        return self.rot(self.rot(r) / self.lam, inverse=True)

    def sample(self, lead: tuple[int, ...], shape: tuple[int, int], **kw) -> Tensor:
        """Blocks ``x ~ N(0, Λ⁻¹)`` of shape ``lead + shape`` (``kw``: ``torch.randn``'s dtype/device/generator)."""
        if self.chol is not None:
            z = torch.randn(lead + (shape[0] * shape[1], 1), **kw)
            return torch.linalg.solve_triangular(self.chol.mT, z, upper=True).reshape(lead + shape)
        return self.rot(torch.randn(lead + shape, **kw) / self.lam.sqrt(), inverse=True)

    def trace_with(self, other: KronBlock) -> Tensor:
        """``tr(Λ_other Λ⁻¹)``, ``Λ`` this factor's block (``Σ_i s_i (g̃_i ⊗ ã_i)ᵀ ℓ⁻¹`` in the eigen form, with
        ``g̃_i = diag(U_Gᵀ G_i U_G)``, ``ã_i = diag(U_Aᵀ A_i U_A)``)."""
        if self.chol is not None:
            return (other.dense() * torch.cholesky_inverse(self.chol)).sum()
        inv = 1.0 / self.lam
        total = (other.diag * self.cov_diag()).sum()
        for t in other.terms:
            gd = torch.diagonal(self.ug.T @ t.G @ self.ug) if self.ug is not None else torch.diagonal(t.G)
            ad = torch.diagonal(self.ua.T @ t.A @ self.ua) if self.ua is not None else torch.diagonal(t.A)
            total = total + t.scale * (gd @ inv @ ad)
        return total

    def outer_quadratic(self, delta: Tensor, a: Tensor) -> Tensor:
        """``(δ ⊗ a) Λ⁻¹ (δ ⊗ a)ᵀ`` per row of ``delta`` (``B × out``) and ``a`` (``B × p``): the variance of a
        linear function whose gradient with respect to ``W̃`` is the outer product ``δ aᵀ``."""
        if self.chol is not None:
            j = (delta[:, :, None] * a[:, None, :]).reshape(delta.shape[0], -1)
            return (j * torch.cholesky_solve(j.T, self.chol).T).sum(-1)
        dr = delta if self.ug is None else delta @ self.ug
        ar = a if self.ua is None else a @ self.ua
        return ((dr**2) @ (1.0 / self.lam) * ar**2).sum(-1)


def eig_factor(t: KronTerm, delta: float, signed: bool = False) -> BlockFactor:
    """The eigen form of ``δ I + s (G ⊗ A)``: ``ℓ = δ + s g aᵀ``, the factors' rounding-level negative eigenvalues
    clipped unless ``signed`` (then it is the exact inverse of the matrix as stored, see :meth:`KronBlock.solve`)."""
    g, ug = torch.linalg.eigh(t.G)
    a, ua = torch.linalg.eigh(t.A)
    if not signed:
        g, a = g.clamp_min(0), a.clamp_min(0)
    return BlockFactor(lam=delta + t.scale * torch.outer(g, a), ug=ug, ua=ua)


def _psd(t: KronTerm) -> KronTerm:
    """The term with ``G`` and ``A`` clipped to their PSD parts (``U max(λ, 0) Uᵀ``)."""
    def clip(m: Tensor) -> Tensor:
        w, u = torch.linalg.eigh(m)
        return (u * w.clamp_min(0)) @ u.T

    return replace(t, A=clip(t.A), G=clip(t.G))


class KronBlock:
    """The precision ``Λ = diag(D) + Σ_i s_i (G_i ⊗ A_i)`` of one layer's block (see the module docstring).

    Args:
        layer: the layer's name (for error messages).
        spec: ``(weight name, bias name or None)``.
        diag: ``D`` in block form (``out × p``).
        terms: the Kronecker terms.
        dense_limit: the largest block (entries) factorised densely.
    """

    def __init__(self, layer: str, spec: LayerSpec, diag: Tensor, terms: Sequence[KronTerm],
                 dense_limit: int = 2000) -> None:
        self.layer, self.spec, self.diag, self.terms = layer, spec, diag, tuple(terms)
        self.dense_limit = dense_limit

    def __repr__(self) -> str:
        return f"KronBlock({self.layer!r}, shape {tuple(self.diag.shape)}, {len(self.terms)} terms)"

    def apply(self, x: Tensor) -> Tensor | None:
        """The Kronecker part ``Σ_i s_i G_i x A_i`` of ``Λ x`` for a block ``x`` (``None`` without terms)."""
        return apply_terms(self.terms, x)

    def matvec(self, x: Tensor) -> Tensor:
        """``Λ x = D ⊙ x + Σ_i s_i G_i x A_i`` for a block ``x``."""
        kx = self.apply(x)
        return self.diag * x if kx is None else self.diag * x + kx

    def dense(self) -> Tensor:
        """The dense ``Λ`` (``out·p × out·p``, row-major ``vec``)."""
        lam = torch.diag(self.diag.reshape(-1))
        for t in self.terms:
            lam = lam + t.scale * torch.kron(t.G, t.A)
        return lam

    def isotropic_diag(self) -> float | None:
        """``δ`` when ``D = δ`` everywhere in the block, else ``None``."""
        lo, hi = float(self.diag.min()), float(self.diag.max())
        return lo if lo == hi else None

    def data_spectrum(self, mean: Tensor, base: float) -> tuple[Tensor, float] | None:
        r"""``(ℓ, ‖μ‖²)`` of the data part ``Λ − base·I`` of this block (float64), for a Laplace evidence.

        The terms are merged into one pair ``s G ⊗ A`` (:func:`~bayescl.gaussian.kron_terms.merge_terms`; exact
        for one term) and ``D`` is replaced by the mean ``d̄`` of ``(D − base)₊``, so ``ℓ_ij = d̄ + s g_i a_j``;
        the entries ``ℓ > 0`` are kept, and ``μ`` (the block ``mean``) is measured in the eigenbasis,
        ``U_Gᵀ μ U_A``, over the same entries: its components in the null space of ``A`` or ``G`` (never touched by
        the data) are left out. ``None`` when no term is left (the caller treats the block elementwise).
        """
        t = self.terms[0] if len(self.terms) == 1 else merge_terms(list(self.terms)) if self.terms else None
        if t is None:
            return None
        d = (self.diag.double() - base).reshape(-1)
        f = eig_factor(replace(t, A=t.A.double(), G=t.G.double()), float(d.clamp_min(0).mean()))
        keep = f.lam > 0
        return f.lam[keep], float((f.rot(mean.double())[keep] ** 2).sum())

    def _singular(self) -> ValueError:
        return ValueError(f"layer {self.layer!r} has a singular precision (an improper site).")

    def factor(self, approx: bool = False) -> BlockFactor | None:
        """Exact factor (eigen or dense) or, with ``approx``, the merged-pair approximation; ``None`` if neither.

        Raises ``ValueError`` naming the layer when the block is singular."""
        ts = self.terms
        delta = self.isotropic_diag()
        if not ts:
            f = BlockFactor(lam=self.diag)
        elif len(ts) == 1 and delta is not None:
            f = eig_factor(ts[0], delta)
        elif self.diag.numel() <= self.dense_limit:
            # in float64 (a weak base prior under strong curvature is beyond float32's Cholesky; see :meth:`solve`)
            # with every factor clipped to PSD as the eigen form clips it: a rank-deficient float32 factor (a
            # 2-way head's G) has eigenvalues of -1e-6 that, times A's, outweigh a base prior of 1e-4
            wide = self.exact(wide_dtype(self.diag.device))
            psd = KronBlock(self.layer, self.spec, wide.diag, [_psd(t) for t in wide.terms], self.dense_limit)
            try:
                chol = torch.linalg.cholesky(psd.dense())
            except RuntimeError:
                raise self._singular() from None
            return BlockFactor(chol=chol.to(self.diag.dtype))
        elif approx:
            f = eig_factor(merge_terms(list(ts)), float(self.diag.mean()))
        else:
            return None
        if bool((f.lam <= 0).any()):
            raise self._singular()
        return f

    def exact(self, dtype: torch.dtype) -> KronBlock:
        """The block cast to ``dtype`` (float64 for the mean; :meth:`KronTerm.exact
        <bayescl.gaussian.kron_terms.KronTerm.exact>`)."""
        return KronBlock(self.layer, self.spec, self.diag.to(dtype), [t.exact(dtype) for t in self.terms],
                         self.dense_limit)

    def solve(self, r: Tensor) -> Tensor:
        """``Λ⁻¹ r`` for a block ``r``, in float64 (:meth:`exact`; :func:`wide_dtype`), returned in ``r``'s dtype:
        the eigen form (one term, isotropic ``D``), the dense Cholesky factor (at most ``dense_limit`` entries),
        else MINRES (:meth:`_minres`).

        It is the exact inverse of the matrix as stored, the one ``η`` and ``quadratic_grad`` use, so the mean of
        ``η = Λ θ`` is ``θ``. With a weak base prior under a strong curvature the condition number reaches
        ``1e9``: a float32 eigendecomposition knows a factor's eigenvalues only to ``1e-7`` of its largest, and a
        float32 Cholesky factor or residual no better. The factors' own rounding (eigenvalues down to ``−1e-8``
        of the largest, times a scale ``s·g`` of ``1e4``) can even make that matrix slightly indefinite: the
        eigen form then keeps the signs (the densities, :meth:`factor`, clip them) and the dense path falls back
        to an eigendecomposition. Raises ``ValueError`` naming the layer when an eigenvalue is zero to rounding."""
        wide = wide_dtype(r.device)
        return self.exact(wide)._solve(r.to(wide)).to(r.dtype)

    def _solve(self, r: Tensor) -> Tensor:
        ts, delta = self.terms, self.isotropic_diag()
        if not ts or (len(ts) == 1 and delta is not None):
            f = BlockFactor(lam=self.diag) if not ts else eig_factor(ts[0], delta, signed=True)
            self._check_invertible(f.lam)
            return f.solve(r)
        if self.diag.numel() > self.dense_limit:
            return self._minres(r)
        lam = self.dense()
        chol, info = torch.linalg.cholesky_ex(lam)
        if int(info) == 0:
            return torch.cholesky_solve(r.reshape(-1, 1), chol).reshape(r.shape)
        w, v = torch.linalg.eigh(lam)
        self._check_invertible(w)
        return (v @ ((v.T @ r.reshape(-1)) / w)).reshape(r.shape)

    def _check_invertible(self, lam: Tensor) -> None:
        """``ValueError`` (:meth:`_singular`) when an eigenvalue is zero to rounding: ``|ℓ| <= 64 ε max|ℓ|``."""
        if bool((lam.abs() <= 64 * torch.finfo(lam.dtype).eps * lam.abs().max()).any()):
            raise self._singular()

    def _preconditioner(self) -> Callable[[Tensor], Tensor]:
        """``M⁻¹`` (symmetric positive definite) for :meth:`_minres`: the eigen form of the merged pair with ``D``
        replaced by its mean (the approximate :meth:`factor`; a sum of terms from similar data is close to one
        pair, so a few iterations do where the condition number is ``1e9``; with Jacobi, hundreds), or Jacobi
        (``diag(Λ)⁻¹``) when that pair is singular. Raises ``ValueError`` naming the layer when ``diag(Λ)`` has an
        entry ``<= 0``."""
        jacobi = self.diag + sum(t.scale * torch.outer(torch.diagonal(t.G), torch.diagonal(t.A)) for t in self.terms)
        if bool((jacobi <= 0).any()):
            raise self._singular()
        merged = merge_terms(list(self.terms))
        if merged is not None:
            f = eig_factor(merged, float(self.diag.mean()))
            if bool((f.lam > 0).all()):
                return f.solve
        return lambda res: res / jacobi

    def _minres(self, r: Tensor, maxiter: int = 5000) -> Tensor:
        """Preconditioned MINRES (Paige & Saunders 1975; :meth:`_preconditioner`) to ``‖res‖_{M⁻¹} <= 1e-10`` of
        ``‖r‖_{M⁻¹}`` (``1e-5`` below float64). Unlike conjugate gradients it needs only a symmetric ``Λ``: the
        factors' rounding can make it slightly indefinite (see :meth:`solve`)."""
        pre, eps = self._preconditioner(), torch.finfo(r.dtype).eps
        tol = 1e-10 if r.dtype == torch.float64 else 1e-5
        x, w, w2 = torch.zeros_like(r), torch.zeros_like(r), torch.zeros_like(r)
        r1 = r2 = r
        y = pre(r1)
        beta1 = beta = float((r1 * y).sum()) ** 0.5
        oldb = dbar = epsln = 0.0
        phibar, cs, sn = beta1, -1.0, 0.0
        for it in range(maxiter):
            if phibar <= tol * beta1:
                return x
            v = y / beta
            y = self.matvec(v)
            if it > 0:
                y = y - (beta / oldb) * r1
            alfa = float((v * y).sum())
            y = y - (alfa / beta) * r2
            r1, r2 = r2, y
            y = pre(r2)
            oldb, beta = beta, max(float((r2 * y).sum()), 0.0) ** 0.5
            oldeps, delta, gbar = epsln, cs * dbar + sn * alfa, sn * dbar - cs * alfa
            epsln, dbar = sn * beta, -cs * beta
            gamma = max((gbar**2 + beta**2) ** 0.5, eps)
            cs, sn = gbar / gamma, beta / gamma
            phi, phibar = cs * phibar, sn * phibar
            w1, w2 = w2, w
            w = (v - oldeps * w1 - delta * w2) / gamma
            x = x + phi * w
            if beta == 0.0:
                return x
        warnings.warn(f"MINRES for layer {self.layer!r} stopped at relative residual "
                      f"{phibar / max(beta1, 1e-300):.2e} after {maxiter} iterations.", stacklevel=4)
        return x
