"""Gaussian with a sum-of-Kronecker-products precision per layer (online KFAC Laplace).

For a ``Linear`` / ``Conv2d`` layer with weight ``W`` (``out × in…``) and bias ``b``, the block is
``W̃ = [W.reshape(out, -1), b]`` (``out × p``, the bias is the last input column). Its precision is

    Λ = diag(D) + Σ_i s_i (G_i ⊗ A_i),       Λ vec(W̃) ↔ D ⊙ W̃ + Σ_i s_i G_i W̃ A_i,

with ``vec`` row-major, ``A_i`` (``p × p``, input side) and ``G_i`` (``out × out``, output-gradient side) symmetric
PSD, ``s_i >= 0``. Every other parameter (BatchNorm, LayerNorm, ...) has only the elementwise part ``D``. ``D``
is, per parameter, a 0-dim tensor (isotropic) or a tensor of the parameter's shape.

Storage is in natural parameters, like :class:`~bayescl.gaussian.diag.DiagGaussian`: ``η = Λ μ`` and the terms, so
products, quotients and tempering are exact additions (terms are **concatenated**, never ``(A1+A2)⊗(G1+G2)``);
the mean ``μ = Λ⁻¹ η`` is solved lazily and cached (it is kept as given by the constructor). Each term carries a
``tag``; the same tag means the same factors, so dividing by a site removes exactly its terms.

Solves, log-determinants, samples and KL per block are

* exact through eigendecompositions when the block has at most one term and an isotropic ``D = δ``
  (``Λ = (U_G ⊗ U_A)(δ + s g ⊗ a)(U_G ⊗ U_A)ᵀ``);
* exact and dense (Cholesky) otherwise when the block has at most ``DENSE_LIMIT = 2000`` entries;
* otherwise the mean is solved by Jacobi-preconditioned conjugate gradients (relative residual ``1e-10`` in
  float64, ``1e-5`` in float32) and ``kl``/``log_prob``/``sample`` use an **approximation**: the terms are merged
  into one Kronecker pair (:meth:`KronGaussian.merge`) and ``D`` replaced by its mean.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from bayescl._checks import as_enum, check_positive_int, check_real
from bayescl._params import linear_layers
from bayescl.gaussian.diag import (
    ROUND_TOL,
    MeanInit,
    Params,
    _nonneg_precision,
    check_same_names,
    check_tensors,
    named_tensors,
)
from bayescl.gaussian.kron_terms import (
    KronTerm,
    _eig_factor,
    _Factor,
    _merge_terms,
    _new_tag,
    low_rank_factor,
)

LayerParams = Mapping[str, tuple[str, str | None]]


class KronGaussian:
    """Gaussian over named parameters with a per-layer sum-of-Kronecker precision (see the module docstring).

    Args:
        mean: name -> ``μ`` for every parameter.
        layer_params: layer name -> ``(weight_name, bias_name or None)``.
        terms: layer name -> list of :class:`KronTerm`, ``(A, G)`` or ``(A, G, scale)`` (fresh tags are drawn).
        diag: name -> ``D`` (0-dim or the parameter's shape, ``>= 0``); missing names get 0.
    """

    kind = "kron"
    DENSE_LIMIT = 2000

    def __init__(
        self,
        mean: Mapping[str, Tensor],
        layer_params: LayerParams,
        terms: Mapping[str, Sequence[KronTerm | tuple]] | None = None,
        diag: Mapping[str, Tensor | float] | None = None,
    ) -> None:
        mean = {n: t.detach() for n, t in dict(mean).items()}
        ref = check_tensors(mean, "mean")
        layers: dict[str, tuple[str, str | None]] = {}
        owner: dict[str, str] = {}
        for layer, spec in dict(layer_params).items():
            if not isinstance(spec, (tuple, list)) or len(spec) != 2:
                raise TypeError(f"layer_params[{layer!r}] must be (weight_name, bias_name | None), got {spec!r}.")
            w, b = spec
            for pn in (w, b):
                if pn is None:
                    continue
                if pn not in mean:
                    raise KeyError(f"layer_params[{layer!r}] names parameter {pn!r}, which is not in mean.")
                if pn in owner:
                    raise ValueError(f"parameter {pn!r} is in layers {owner[pn]!r} and {layer!r}; one layer each.")
                owner[pn] = layer
            if mean[w].dim() < 2:
                raise ValueError(f"layer {layer!r}: weight {w!r} has shape {tuple(mean[w].shape)}; it needs >= 2 dims.")
            if b is not None and tuple(mean[b].shape) != (mean[w].shape[0],):
                raise ValueError(f"layer {layer!r}: bias {b!r} has shape {tuple(mean[b].shape)}; "
                                 f"expected ({mean[w].shape[0]},).")
            layers[layer] = (w, b)
        dg = {n: torch.zeros((), dtype=t.dtype, device=t.device) for n, t in mean.items()}
        for n, d in dict(diag or {}).items():
            if n not in mean:
                raise KeyError(f"diag names parameter {n!r}, which is not in mean.")
            d = torch.as_tensor(d, dtype=mean[n].dtype, device=mean[n].device)
            if d.dim() != 0 and tuple(d.shape) != tuple(mean[n].shape):
                raise ValueError(f"diag[{n!r}] has shape {tuple(d.shape)}; allowed: () or {tuple(mean[n].shape)}.")
            check_tensors({n: d}, "diag", ref)
            if bool((d < 0).any()):
                raise ValueError(f"diag[{n!r}] has negative entries (min {float(d.min()):.3g}); it must be >= 0.")
            dg[n] = d.detach()
        tms: dict[str, dict[str, KronTerm]] = {layer: {} for layer in layers}
        for layer, lst in dict(terms or {}).items():
            if layer not in layers:
                raise KeyError(f"terms names layer {layer!r}, which is not in layer_params; known: {list(layers)}.")
            out_dim, p = self._block_shape(layers[layer], mean)
            for t in lst:
                t = t if isinstance(t, KronTerm) else KronTerm(*t)
                t = replace(t, tag=t.tag or _new_tag(),
                            scale=check_real(t.scale, f"scale of a term of layer {layer!r}", low=0.0))
                if tuple(t.A.shape) != (p, p) or tuple(t.G.shape) != (out_dim, out_dim):
                    raise ValueError(f"layer {layer!r}: factors A {tuple(t.A.shape)} / G {tuple(t.G.shape)}; "
                                     f"expected A ({p}, {p}) and G ({out_dim}, {out_dim}).")
                check_tensors({"A": t.A, "G": t.G}, f"terms[{layer!r}]", ref)
                tms[layer][t.tag] = replace(t, A=t.A.detach(), G=t.G.detach())
        self._layers, self._diag, self._terms = layers, dg, tms
        self._eta = {n: t.detach() for n, t in self._matvec(mean).items()}
        self._mean: dict[str, Tensor] | None = mean

    @classmethod
    def _trusted(cls, eta, layers, terms, diag, mean=None) -> KronGaussian:
        out = cls.__new__(cls)
        out._eta, out._layers, out._terms, out._diag, out._mean = eta, layers, terms, diag, mean
        return out

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_factors(
        cls,
        mean: Mapping[str, Tensor],
        factors: Mapping[str, tuple[Tensor, Tensor]],
        layer_params: LayerParams,
        diag: Mapping[str, Tensor] | None = None,
    ) -> KronGaussian:
        """The site ``Λ = diag(D) + Σ_layers (G ⊗ A)`` at ``mean`` from one KFAC pair ``(A, G)`` per layer."""
        return cls(mean, layer_params, {layer: [(A, G)] for layer, (A, G) in factors.items()}, diag)

    @classmethod
    def isotropic(cls, model: nn.Module, precision: float, mean: MeanInit | str = "zeros") -> KronGaussian:
        """The prior ``N(μ0, I/precision)`` over ``model``'s trainable parameters, with its Linear/Conv2d layers."""
        p = check_real(precision, "precision", low=0.0, low_open=True)
        params = named_tensors(model, "model")
        layers = linear_layers(model, params)
        if not layers:
            types = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(False))})
            raise ValueError(f"model has no Linear or Conv2d layer with trainable weights; found {types}.")
        init = as_enum(MeanInit, mean, "mean")
        mu = {n: (t.clone() if init is MeanInit.CURRENT else torch.zeros_like(t)) for n, t in params.items()}
        return cls(mu, layers, None, {n: p for n in params})

    # ------------------------------------------------------------------ views
    @staticmethod
    def _block_shape(spec: tuple[str, str | None], d: Mapping[str, Tensor]) -> tuple[int, int]:
        w, b = spec
        return d[w].shape[0], d[w][0].numel() + (b is not None)

    @staticmethod
    def _to_block(spec, d: Mapping[str, Tensor]) -> Tensor:
        w, b = spec
        wt = d[w].reshape(d[w].shape[0], -1)
        return wt if b is None else torch.cat([wt, d[b].reshape(-1, 1)], dim=1)

    @staticmethod
    def _from_block(spec, x: Tensor, shapes: Mapping[str, Tensor]) -> dict[str, Tensor]:
        w, b = spec
        out = {w: x[..., : shapes[w][0].numel()].reshape(x.shape[:-2] + tuple(shapes[w].shape))}
        if b is not None:
            out[b] = x[..., -1]
        return out

    def _diag_full(self, n: str) -> Tensor:
        return self._diag[n].expand(self._eta[n].shape)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._eta)

    @property
    def layers(self) -> dict[str, tuple[str, str | None]]:
        return dict(self._layers)

    @property
    def terms(self) -> dict[str, list[KronTerm]]:
        return {layer: list(t.values()) for layer, t in self._terms.items()}

    @property
    def diag(self) -> dict[str, Tensor]:
        return dict(self._diag)

    @property
    def eta(self) -> dict[str, Tensor]:
        return dict(self._eta)

    @property
    def num_terms(self) -> dict[str, int]:
        return {layer: len(t) for layer, t in self._terms.items()}

    def num_floats(self) -> int:
        """Floats stored: ``η``, ``D``, every term's ``A`` and ``G``, and the cached mean."""
        n = sum(t.numel() for t in self._eta.values()) + sum(d.numel() for d in self._diag.values())
        n += sum(t.A.numel() + t.G.numel() for ts in self._terms.values() for t in ts.values())
        return n + (sum(t.numel() for t in self._mean.values()) if self._mean is not None else 0)

    def __len__(self) -> int:
        return sum(t.numel() for t in self._eta.values())

    def __contains__(self, name: object) -> bool:
        return name in self._eta

    def __repr__(self) -> str:
        return f"KronGaussian({len(self._eta)} parameters, layers {self.num_terms})"

    # ------------------------------------------------------------------ structured linear algebra
    def _matvec(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``Λ x`` without materialising ``Λ`` (autograd-friendly)."""
        out = {n: self._diag[n] * t for n, t in x.items()}
        for layer, spec in self._layers.items():
            kb = self._block_apply(layer, x)
            if kb is not None:
                for n, v in self._from_block(spec, kb, x).items():
                    out[n] = out[n] + v
        return out

    def _block_apply(self, layer: str, x: Mapping[str, Tensor]) -> Tensor | None:
        """``Σ_i s_i G_i W̃ A_i`` for one layer's block of ``x`` (``None`` when the layer has no term)."""
        ts = self._terms[layer]
        if not ts:
            return None
        xb = self._to_block(self._layers[layer], x)
        return sum(t.scale * t.apply(xb) for t in ts.values())

    def _block_diag(self, spec) -> Tensor:
        return self._to_block(spec, {n: self._diag_full(n) for n in spec if n is not None})

    def _iso(self, spec) -> float | None:
        d = self._block_diag(spec)
        lo, hi = float(d.min()), float(d.max())
        return lo if lo == hi else None

    def _dense_block(self, layer: str) -> Tensor:
        spec = self._layers[layer]
        lam = torch.diag(self._block_diag(spec).reshape(-1))
        for t in self._terms[layer].values():
            lam = lam + t.scale * torch.kron(t.G, t.A)
        return lam

    def _factor(self, layer: str, approx: bool) -> _Factor | None:
        """Exact factor (eigen or dense) or, with ``approx``, the merged-pair approximation; ``None`` if neither."""
        spec = self._layers[layer]
        ts = list(self._terms[layer].values())
        delta = self._iso(spec)
        if not ts:
            f = _Factor(lam=self._block_diag(spec))
        elif len(ts) == 1 and delta is not None:
            f = _eig_factor(ts[0], delta)
        elif self._block_diag(spec).numel() <= self.DENSE_LIMIT:
            try:
                return _Factor(chol=torch.linalg.cholesky(self._dense_block(layer)))
            except RuntimeError:
                raise ValueError(f"layer {layer!r} has a singular precision (an improper site).") from None
        elif approx:
            f = _eig_factor(_merge_terms(ts), float(self._block_diag(spec).mean()))
        else:
            return None
        if bool((f.lam <= 0).any()):
            raise ValueError(f"layer {layer!r} has a singular precision (an improper site).")
        return f

    def _solve_block(self, layer: str, r: Tensor) -> Tensor:
        f = self._factor(layer, approx=False)
        if f is None:
            return self._cg(layer, r)
        if f.chol is not None:
            return torch.cholesky_solve(r.reshape(-1, 1), f.chol).reshape(r.shape)
        return f.rot(f.rot(r) / f.lam, inverse=True)

    def _cg(self, layer: str, r: Tensor, maxiter: int = 5000) -> Tensor:
        spec = self._layers[layer]
        ts = list(self._terms[layer].values())
        dg = self._block_diag(spec)
        pre = dg + sum(t.scale * torch.outer(torch.diagonal(t.G), torch.diagonal(t.A)) for t in ts)
        if bool((pre <= 0).any()):
            raise ValueError(f"layer {layer!r} has a singular precision (an improper site).")

        def mv(x: Tensor) -> Tensor:
            return dg * x + sum(t.scale * t.apply(x) for t in ts)

        tol = (1e-10 if r.dtype == torch.float64 else 1e-5) * float(r.norm())
        x = torch.zeros_like(r)
        res = r.clone()
        z = res / pre
        d = z.clone()
        rz = (res * z).sum()
        for _ in range(maxiter):
            if float(res.norm()) <= tol:
                return x
            q = mv(d)
            alpha = rz / (d * q).sum()
            x, res = x + alpha * d, res - alpha * q
            z = res / pre
            rz_new = (res * z).sum()
            d, rz = z + (rz_new / rz) * d, rz_new
        warnings.warn(f"conjugate gradients for layer {layer!r} stopped at relative residual "
                      f"{float(res.norm()) / max(float(r.norm()), 1e-300):.2e} after {maxiter} iterations.",
                      stacklevel=3)
        return x

    def _owned(self) -> set[str]:
        return {n for spec in self._layers.values() for n in spec if n is not None}

    def _require_diag_proper(self, what: str) -> None:
        owned = self._owned()
        for n, d in self._diag.items():
            if n not in owned and bool((d <= 0).any()):
                raise ValueError(f"{what} needs a proper Gaussian but parameter {n!r} has zero precision.")

    @property
    def mean(self) -> dict[str, Tensor]:
        """``μ = Λ⁻¹ η`` (cached; raises ``ValueError`` on an improper Gaussian)."""
        if self._mean is None:
            self._require_diag_proper("mean")
            mu = {n: self._eta[n] / self._diag[n] for n in self._eta if n not in self._owned()}
            for layer, spec in self._layers.items():
                mu.update(self._from_block(spec, self._solve_block(layer, self._to_block(spec, self._eta)), self._eta))
            self._mean = {n: mu[n] for n in self._eta}
        return dict(self._mean)

    # ------------------------------------------------------------------ algebra
    def _aligned(self, other: object, op: str) -> tuple[dict, dict]:
        """Check names/shapes; return the union of both layer maps and the matching term dicts."""
        if not isinstance(other, KronGaussian):
            raise TypeError(f"{op} needs another KronGaussian, got {type(other).__name__}.")
        check_same_names(self._eta, other._eta, "other")
        layers = dict(self._layers)
        for layer, spec in other._layers.items():
            if layer in layers and layers[layer] != spec:
                raise ValueError(f"layer {layer!r} is {layers[layer]} in self but {spec} in other; they must match.")
            layers.setdefault(layer, spec)
        owners: dict[str, str] = {}
        for layer, spec in layers.items():
            for pn in spec:
                if pn is not None and owners.setdefault(pn, layer) != layer:
                    raise ValueError(f"parameter {pn!r} is in layer {owners[pn]!r} in one operand and {layer!r} "
                                     "in the other; layer structures must agree.")
        return layers, {layer: dict(self._terms.get(layer, {})) for layer in layers}

    def __mul__(self, other: KronGaussian) -> KronGaussian:
        """Product: ``η`` and ``D`` add, term lists are concatenated (same tag: scales add)."""
        layers, terms = self._aligned(other, "product")
        for layer, ts in other._terms.items():
            for tag, t in ts.items():
                old = terms[layer].get(tag)
                terms[layer][tag] = t if old is None else replace(old, scale=old.scale + t.scale)
        return KronGaussian._trusted({n: v + other._eta[n] for n, v in self._eta.items()}, layers, terms,
                                     {n: d + other._diag[n] for n, d in self._diag.items()})

    def divide(self, other: KronGaussian, allow_improper: bool = False) -> KronGaussian:
        """Quotient: ``η`` and ``D`` subtract and ``other``'s terms are removed by tag.

        Raises ``ValueError`` when a term of ``other`` is not in ``self`` (or has a larger scale), when ``D`` would
        become negative beyond rounding, or, unless ``allow_improper``, when a parameter outside any layer with
        terms would be left with ``D <= 0``.
        """
        layers, terms = self._aligned(other, "division")
        for layer, ts in other._terms.items():
            for tag, t in ts.items():
                old = terms[layer].get(tag)
                if old is None or old.scale - t.scale < -ROUND_TOL * old.scale:
                    raise ValueError(f"layer {layer!r}: term {tag[:8]} of the divisor is not held by self "
                                     "(divide only by sites that were multiplied in; merge() forfeits this).")
                s = old.scale - t.scale
                if s <= ROUND_TOL * old.scale:
                    del terms[layer][tag]
                else:
                    terms[layer][tag] = replace(old, scale=s)
        diag = {}
        with_terms = {n for layer, spec in layers.items() if terms[layer] for n in spec if n is not None}
        for n, d in self._diag.items():
            diag[n] = _nonneg_precision(d - other._diag[n], d, n, "division", allow_improper or n in with_terms)
        return KronGaussian._trusted({n: v - other._eta[n] for n, v in self._eta.items()}, layers, terms, diag)

    def __truediv__(self, other: KronGaussian) -> KronGaussian:
        return self.divide(other)

    def with_mean(self, mean: Params) -> KronGaussian:
        """The Gaussian with the same precision re-centred on ``mean``: ``η = Λ mean`` (structured matvec)."""
        mu = {n: t.to(self._eta[n]) for n, t in named_tensors(mean, "mean").items()}
        check_same_names(self._eta, mu, "mean")
        eta = {n: v.detach() for n, v in self._matvec(mu).items()}
        return KronGaussian._trusted(eta, dict(self._layers), {k: dict(v) for k, v in self._terms.items()},
                                     dict(self._diag), mu)

    def temper(self, alpha: float) -> KronGaussian:
        """``q^α``: ``η``, ``D`` and every scale times ``α >= 0``; the mean is unchanged (``α > 0``)."""
        a = check_real(alpha, "alpha", low=0.0)
        terms = {layer: ({tag: replace(t, scale=a * t.scale) for tag, t in ts.items()} if a > 0 else {})
                 for layer, ts in self._terms.items()}
        mean = self._mean if a > 0 else None
        return KronGaussian._trusted({n: a * v for n, v in self._eta.items()}, dict(self._layers), terms,
                                     {n: a * d for n, d in self._diag.items()}, mean)

    def __pow__(self, alpha: float) -> KronGaussian:
        return self.temper(alpha)

    def merge(self, method: str = "frobenius") -> KronGaussian:
        """Approximate every layer's sum ``Σ s_i G_i ⊗ A_i`` by its nearest single pair ``s G ⊗ A``.

        ``"frobenius"``: the best Frobenius-norm Kronecker approximation (Van Loan & Pitsianis 1993): the top
        singular pair of the rearranged sum ``Σ s_i vec(G_i) vec(A_i)ᵀ``, found by power iteration on the
        ``k × k`` Gram matrices (``A = Σ α_i A_i``, ``G = Σ γ_i G_i`` with ``α, γ >= 0``, so both stay PSD).
        Exact when all terms share one factor; otherwise an **approximation** (the mean is re-solved, η kept).
        Merged terms get fresh tags, so dividing out a site is no longer possible.
        """
        if method != "frobenius":
            raise ValueError(f"method={method!r} is not valid; allowed: 'frobenius'.")
        terms = {}
        for layer, ts in self._terms.items():
            m = _merge_terms(list(ts.values())) if len(ts) > 1 else None
            terms[layer] = dict(ts) if len(ts) <= 1 else ({} if m is None else {m.tag: m})
        return KronGaussian._trusted(dict(self._eta), dict(self._layers), terms, dict(self._diag))

    def low_rank(self, rank: int, keep_diagonal: bool = False) -> KronGaussian:
        """Truncate every Kronecker factor to its top ``rank`` eigen-directions (an **approximation**).

        ``A_r = U_A U_Aᵀ`` keeps the largest eigenvalues; the prior gradient then costs
        ``O(out·p·rank)`` instead of ``O(out·p·(out + p))`` per term (MNIST's input covariance is close to low
        rank). With ``keep_diagonal`` each factor keeps the diagonal of what was cut,
        ``A_r = U_A U_Aᵀ + diag(A − U_A U_Aᵀ)``: every weight keeps a share of its curvature at twice the
        low-rank cost. ``η`` is kept, so re-centre with :meth:`with_mean`; new tags (a site can no longer be
        divided out).
        """
        r = check_positive_int(rank, "rank")
        terms: dict[str, dict[str, KronTerm]] = {}
        for layer, ts in self._terms.items():
            terms[layer] = {}
            for t in ts.values():
                (A, UA, dA), (G, UG, dG) = (low_rank_factor(t.A, r, keep_diagonal),
                                            low_rank_factor(t.G, r, keep_diagonal))
                nt = KronTerm(A, G, t.scale, _new_tag(), UA, UG, dA, dG)
                terms[layer][nt.tag] = nt
        return KronGaussian._trusted(dict(self._eta), dict(self._layers), terms, dict(self._diag))

    # ------------------------------------------------------------------ densities
    def _blocks(self, approx: bool = True):
        """Yield ``(layer, spec, factor)`` per layer; a diag-only parameter comes as ``(name, None, None)``."""
        owned = self._owned()
        for n in self._eta:
            if n not in owned:
                yield n, None, None
        for layer, spec in self._layers.items():
            yield layer, spec, self._factor(layer, approx)

    def logdet(self) -> Tensor:
        """``log det Λ`` (exact or approximated per block, see the module docstring)."""
        self._require_diag_proper("logdet")
        total = torch.zeros((), dtype=self._dtype(), device=self._device())
        for key, _, f in self._blocks():
            total = total + (torch.log(self._diag_full(key)).sum() if f is None else f.logdet())
        return total

    def kl(self, other: KronGaussian) -> Tensor:
        """``KL(p || q) = ½ [tr(Λq Σp) + (μq−μp)ᵀ Λq (μq−μp) − n + log det Λp − log det Λq]`` (p = self)."""
        layers, _ = self._aligned(other, "kl")
        p, q = self._relayer(layers), other._relayer(layers)
        mp, mq = p.mean, q.mean
        d = {n: mq[n] - mp[n] for n in mp}
        quad = sum((v * d[n]).sum() for n, v in q._matvec(d).items())
        tr = torch.zeros((), dtype=self._dtype(), device=self._device())
        for key, spec, f in p._blocks():
            if f is None:
                tr = tr + (q._diag_full(key) / p._diag_full(key)).sum()
            else:
                tr = tr + _trace(f, q, key, spec)
        return 0.5 * (tr + quad - len(self) + p.logdet() - q.logdet())

    def _relayer(self, layers: dict) -> KronGaussian:
        return KronGaussian._trusted(self._eta, layers, {k: self._terms.get(k, {}) for k in layers}, self._diag,
                                     self._mean)

    def quadratic(self, params: Params) -> Tensor:
        """``½ (θ−μ)ᵀ Λ (θ−μ)`` via the structured matvec (differentiable in ``θ``; needs a mean)."""
        theta = named_tensors(params, "params", detach=False)
        check_same_names(self._eta, theta, "params")
        mu = self.mean
        d = {n: theta[n] - mu[n] for n in mu}
        return 0.5 * sum((v * d[n]).sum() for n, v in self._matvec(d).items())

    @torch.no_grad()
    def quadratic_grad(self, params: Params) -> dict[str, Tensor]:
        """``Λ θ − η`` per parameter (``Σ s_i G_i W̃ A_i + D ⊙ W̃ − η̃`` per layer), no autograd, no solve."""
        theta = named_tensors(params)
        check_same_names(self._eta, theta, "params")
        return {n: v - self._eta[n] for n, v in self._matvec(theta).items()}

    def log_prob(self, params: Params) -> Tensor:
        """``−½ (θ−μ)ᵀΛ(θ−μ) + ½ log det Λ − (n/2) log 2π`` (differentiable in ``θ``)."""
        return -self.quadratic(params) + 0.5 * self.logdet() - 0.5 * len(self) * math.log(2 * math.pi)

    def sample(self, n: int | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draw from ``N(μ, Λ⁻¹)``; shape ``(n, *shape)`` per parameter when ``n`` is given."""
        if n is not None:
            check_positive_int(n, "n")
        self._require_diag_proper("sample")
        lead = () if n is None else (n,)
        mu = self.mean
        kw = {"dtype": self._dtype(), "device": self._device(), "generator": generator}
        out = {}
        for key, spec, f in self._blocks():
            if f is None:
                out[key] = mu[key] + torch.randn(lead + tuple(mu[key].shape), **kw) / self._diag_full(key).sqrt()
                continue
            shape = self._block_shape(spec, mu)
            if f.chol is not None:
                z = torch.randn(lead + (shape[0] * shape[1], 1), **kw)
                x = torch.linalg.solve_triangular(f.chol.mT, z, upper=True).reshape(lead + shape)
            else:
                x = f.rot(torch.randn(lead + shape, **kw) / f.lam.sqrt(), inverse=True)
            out.update({k: mu[k] + v for k, v in self._from_block(spec, x, mu).items()})
        return {k: out[k] for k in self._eta}

    # ------------------------------------------------------------------ structure
    def restrict(self, names: Iterable[str]) -> KronGaussian:
        """The marginal over ``names`` when no layer is split (exact for a block-diagonal precision)."""
        names = list(names)
        for n in names:
            if n not in self._eta:
                raise KeyError(f"parameter {n!r} is not in this Gaussian; known: {', '.join(self._eta)}.")
        keep = set(names)
        layers = {}
        for layer, spec in self._layers.items():
            inside = [pn in keep for pn in spec if pn is not None]
            if any(inside) and not all(inside):
                raise ValueError(f"restrict would split layer {layer!r} {spec}; keep both or neither.")
            if all(inside):
                layers[layer] = spec
        mean = None if self._mean is None else {n: self._mean[n] for n in names}
        return KronGaussian._trusted({n: self._eta[n] for n in names}, layers,
                                     {k: dict(self._terms[k]) for k in layers}, {n: self._diag[n] for n in names},
                                     mean)

    def extend(self, params: Params, precision: float, mean: MeanInit | str = "current") -> KronGaussian:
        """Add parameters not present yet with isotropic ``precision >= 0`` (mean: the tensors or 0).

        With an ``nn.Module``, its new Linear/Conv2d layers are registered as layers (without terms).
        """
        p = check_real(precision, "precision", low=0.0)
        init = as_enum(MeanInit, mean, "mean")
        tensors = named_tensors(params)
        new = {n: t.to(self._device(), self._dtype()) for n, t in tensors.items() if n not in self._eta}
        for n, t in tensors.items():
            if n in self._eta and tuple(t.shape) != tuple(self._eta[n].shape):
                raise ValueError(f"parameter {n!r} has shape {tuple(t.shape)} in params but "
                                 f"{tuple(self._eta[n].shape)} in self; shapes must match.")
        mu = {n: (t.clone() if init is MeanInit.CURRENT else torch.zeros_like(t)) for n, t in new.items()}
        layers, terms = dict(self._layers), {k: dict(v) for k, v in self._terms.items()}
        if isinstance(params, nn.Module):
            for layer, spec in linear_layers(params, tensors).items():
                if all(pn in new for pn in spec if pn is not None) and layer not in layers:
                    layers[layer], terms[layer] = spec, {}
        z = torch.zeros((), dtype=self._dtype(), device=self._device())
        eta = dict(self._eta) | {n: p * m for n, m in mu.items()}
        diag = dict(self._diag) | {n: z + p for n in new}
        cache = None if self._mean is None else dict(self._mean) | mu
        return KronGaussian._trusted(eta, layers, terms, diag, cache)

    def _dtype(self) -> torch.dtype:
        return next(iter(self._eta.values())).dtype

    def _device(self) -> torch.device:
        return next(iter(self._eta.values())).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KronGaussian:
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        opt = lambda v: None if v is None else mv(v)
        terms = {k: {g: replace(t, A=mv(t.A), G=mv(t.G), UA=opt(t.UA), UG=opt(t.UG), dA=opt(t.dA), dG=opt(t.dG))
                     for g, t in ts.items()}
                 for k, ts in self._terms.items()}
        mean = None if self._mean is None else {n: mv(t) for n, t in self._mean.items()}
        return KronGaussian._trusted({n: mv(t) for n, t in self._eta.items()}, dict(self._layers), terms,
                                     {n: mv(t) for n, t in self._diag.items()}, mean)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain nested dicts of tensors, with ``"kind": "kron"``."""
        return {
            "kind": self.kind,
            "eta": dict(self._eta),
            "diag": dict(self._diag),
            "layers": {k: tuple(v) for k, v in self._layers.items()},
            "terms": {k: [{"A": t.A, "G": t.G, "scale": t.scale, "tag": t.tag, "UA": t.UA, "UG": t.UG,
                     "dA": t.dA, "dG": t.dG}
                          for t in ts.values()]
                      for k, ts in self._terms.items()},
            "mean": None if self._mean is None else dict(self._mean),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> KronGaussian:
        if not isinstance(state, Mapping) or state.get("kind") != cls.kind:
            got = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state kind={got!r} cannot be loaded into KronGaussian; expected 'kron'.")
        eta = dict(state["eta"])
        check_tensors(eta, "eta")
        layers = {k: (v[0], v[1]) for k, v in state["layers"].items()}
        terms = {k: {d["tag"]: KronTerm(d["A"], d["G"], float(d["scale"]), d["tag"], d.get("UA"), d.get("UG"),
                                     d.get("dA"), d.get("dG"))
                     for d in state["terms"].get(k, [])}
                 for k in layers}
        mean = None if state.get("mean") is None else dict(state["mean"])
        return cls._trusted(eta, layers, terms, dict(state["diag"]), mean)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load in place; raises ``ValueError`` naming the first parameter whose name or shape differs."""
        new = KronGaussian.from_state_dict(state)
        check_same_names(self._eta, new._eta, "state")
        self._eta, self._layers, self._terms, self._diag, self._mean = (
            new._eta, new._layers, new._terms, new._diag, new._mean)

    def to_dense(self) -> tuple[list[str], Tensor]:
        """Dense ``Λ`` in the order of each layer's row-major ``vec(W̃)`` then the other parameters (tests only)."""
        order, blocks = [], []
        for layer in self._layers:
            order.append(layer)
            blocks.append(self._dense_block(layer))
        for n in self._eta:
            if n not in self._owned():
                order.append(n)
                blocks.append(torch.diag(self._diag_full(n).reshape(-1)))
        return order, torch.block_diag(*blocks)


def _trace(f: _Factor, q: KronGaussian, layer: str, spec) -> Tensor:
    """``tr(Λq Σp)`` for one block, ``Σp`` given by the factor ``f`` of ``Λp``."""
    if f.chol is not None:
        return (q._dense_block(layer) * torch.cholesky_inverse(f.chol)).sum()
    inv = 1.0 / f.lam
    total = (q._block_diag(spec) * f.cov_diag()).sum()
    for t in q._terms[layer].values():
        gd = torch.diagonal(f.ug.T @ t.G @ f.ug) if f.ug is not None else torch.diagonal(t.G)
        ad = torch.diagonal(f.ua.T @ t.A @ f.ua) if f.ua is not None else torch.diagonal(t.A)
        total = total + t.scale * (gd @ inv @ ad)
    return total
