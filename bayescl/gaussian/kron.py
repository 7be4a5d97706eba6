"""Gaussian with a sum-of-Kronecker-products precision per layer (online KFAC Laplace).

For a ``Linear`` / ``Conv2d`` layer with weight ``W`` (``out × in…``) and bias ``b``, the block is
``W̃ = [W.reshape(out, -1), b]`` (``out × p``, the bias is the last input column). Its precision is

    Λ = diag(D) + Σ_i s_i (G_i ⊗ A_i),       Λ vec(W̃) ↔ D ⊙ W̃ + Σ_i s_i G_i W̃ A_i,

with ``vec`` row-major, ``A_i`` (``p × p``, input side) and ``G_i`` (``out × out``, output-gradient side) symmetric
PSD, ``s_i >= 0``. Every other parameter (BatchNorm, LayerNorm, ...) has only the elementwise part ``D``. ``D``
is, per parameter, a 0-dim tensor (isotropic) or a tensor of the parameter's shape. One layer's block is a
:class:`~bayescl.gaussian.kron_block.KronBlock` (:meth:`KronGaussian.block`): the public per-layer API.

Storage is in natural parameters, like :class:`~bayescl.gaussian.diag.DiagGaussian`: ``η = Λ μ`` (in float64
whatever the parameters' dtype, the mean solved from it in float64: see :mod:`bayescl.gaussian.kron_store`) and
the terms, so products, quotients and tempering are exact additions (terms are **concatenated**, never
``(A1+A2)⊗(G1+G2)``); the mean ``μ = Λ⁻¹ η`` is solved lazily and cached (it is kept as given by the
constructor). Each term carries a ``tag``; the same tag means the same factors, so dividing by a site removes
exactly its terms.

Solves, log-determinants, samples and KL per block are

* exact through eigendecompositions when the block has at most one term and an isotropic ``D = δ``
  (``Λ = (U_G ⊗ U_A)(δ + s g ⊗ a)(U_G ⊗ U_A)ᵀ``);
* exact and dense (Cholesky) otherwise when the block has at most ``DENSE_LIMIT = 2000`` entries;
* otherwise the mean is solved by MINRES preconditioned with the merged pair (in float64, to relative residual
  ``1e-10``; slow to converge for dissimilar terms at a condition number of ``1e9``) and
  ``kl``/``log_prob``/``sample`` use an **approximation**: the terms are merged into one Kronecker pair
  (:meth:`KronGaussian.merge`) and ``D`` replaced by its mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import Tensor, nn

from bayescl._checks import as_enum, check_positive_int, check_real
from bayescl._params import linear_layers
from bayescl.gaussian.diag import elementwise_spectrum, spectrum_total
from bayescl.gaussian.kron_block import from_block, to_block, widen
from bayescl.gaussian.kron_density import KronDensities
from bayescl.gaussian.kron_store import LayerParams
from bayescl.gaussian.kron_terms import KronTerm, low_rank_factor, merge_terms, new_tag
from bayescl.gaussian.tensors import (
    ROUND_TOL,
    MeanInit,
    Params,
    check_known,
    check_new_shapes,
    check_same_names,
    first_dtype_device,
    initial_mean,
    named_tensors,
    nonneg_precision,
)

__all__ = ["KronGaussian", "KronTerm", "LayerParams"]


class KronGaussian(KronDensities):
    """Gaussian over named parameters with a per-layer sum-of-Kronecker precision (see the module docstring).

    Args:
        mean: name -> ``μ`` for every parameter.
        layer_params: layer name -> ``(weight_name, bias_name or None)``.
        terms: layer name -> list of :class:`KronTerm`, ``(A, G)`` or ``(A, G, scale)`` (fresh tags are drawn).
        diag: name -> ``D`` (0-dim or the parameter's shape, ``>= 0``); missing names get 0.
    """

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
        return cls({n: initial_mean(t, init) for n, t in params.items()}, layers, None, {n: p for n in params})

    # ------------------------------------------------------------------ algebra
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
            diag[n] = nonneg_precision(d - other._diag[n], d, n, "division", allow_improper or n in with_terms)
        return KronGaussian._trusted({n: v - other._eta[n] for n, v in self._eta.items()}, layers, terms, diag)

    def __truediv__(self, other: KronGaussian) -> KronGaussian:
        return self.divide(other)

    def with_mean(self, mean: Params) -> KronGaussian:
        """The Gaussian with the same precision re-centred on ``mean``: ``η = Λ mean`` (structured matvec, in
        float64 from the mean cast to the parameters' dtype)."""
        given = named_tensors(mean, "mean")
        check_same_names(self._eta, given, "mean")
        mu = {n: t.to(self._diag[n]) for n, t in given.items()}
        eta = {n: v.detach() for n, v in self._matvec(mu, wide=True).items()}
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
            m = merge_terms(list(ts.values())) if len(ts) > 1 else None
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
                nt = KronTerm(A, G, t.scale, new_tag(), UA, UG, dA, dG)
                terms[layer][nt.tag] = nt
        return KronGaussian._trusted(dict(self._eta), dict(self._layers), terms, dict(self._diag))

    # ------------------------------------------------------------------ structure
    def restrict(self, names: Iterable[str]) -> KronGaussian:
        """The marginal over ``names`` when no layer is split (exact for a block-diagonal precision)."""
        names = check_known(names, self._eta)
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
        dtype, device = first_dtype_device(self._diag)
        new = {n: t.to(device, dtype) for n, t in tensors.items() if n not in self._eta}
        check_new_shapes(tensors, self._eta)
        mu = {n: initial_mean(t, init) for n, t in new.items()}
        layers, terms = dict(self._layers), {k: dict(v) for k, v in self._terms.items()}
        if isinstance(params, nn.Module):
            for layer, spec in linear_layers(params, tensors).items():
                if all(pn in new for pn in spec if pn is not None) and layer not in layers:
                    layers[layer], terms[layer] = spec, {}
        z = self._zero()
        eta = dict(self._eta) | {n: p * widen(m) for n, m in mu.items()}
        diag = dict(self._diag) | {n: z + p for n in new}
        cache = None if self._mean is None else dict(self._mean) | mu
        return KronGaussian._trusted(eta, layers, terms, diag, cache)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KronGaussian:
        """Moved to ``device`` and cast to ``dtype`` (the parameters' dtype: ``η`` stays in float64)."""
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        terms = {k: {g: t.to(device, dtype) for g, t in ts.items()} for k, ts in self._terms.items()}
        mean = None if self._mean is None else {n: mv(t) for n, t in self._mean.items()}
        return KronGaussian._trusted({n: t.to(device=device) for n, t in self._eta.items()}, dict(self._layers), terms,
                                     {n: mv(t) for n, t in self._diag.items()}, mean)

    # ------------------------------------------------------------------ the interface both kinds share
    def elementwise_precision(self) -> dict[str, Tensor]:
        """The elementwise part ``D`` of ``Λ`` per parameter, expanded to the parameter's shape."""
        return {n: self._diag_full(n) for n in self._eta}

    def precision_diagonal(self) -> dict[str, Tensor]:
        """The diagonal of ``Λ`` per parameter, in the parameter's shape: ``D`` plus, in a Kronecker layer's block,
        ``Σ_i s_i diag(G_i) diag(A_i)ᵀ`` (the diagonal of ``s_i G_i ⊗ A_i``)."""
        out = self.elementwise_precision()
        for layer, spec in self._layers.items():
            block = self.block(layer)
            d = block.diag.clone()
            for t in block.terms:
                d = d + t.scale * torch.outer(torch.diagonal(t.G), torch.diagonal(t.A)).to(d.dtype)
            out.update(from_block(spec, d, self._eta))
        return out

    def data_spectrum(self, base_precision: float) -> tuple[Tensor, float]:
        """``(h, ‖μ‖²)``: the positive eigenvalues of the data part ``H = Λ − τ₀ I`` (float64) and the squared
        norm of the mean over the directions they belong to (see :mod:`bayescl.methods.marglik`): per layer
        :meth:`KronBlock.data_spectrum <bayescl.gaussian.kron_block.KronBlock.data_spectrum>` (the terms merged
        into one pair, an approximation for several terms), elementwise ``(D − τ₀)₊`` for the other parameters."""
        mean = self.mean
        parts, elementwise = [], [n for n in self._eta if n not in self._owned()]
        for layer, spec in self._layers.items():
            part = self.block(layer).data_spectrum(to_block(spec, mean), base_precision)
            if part is None:
                parts += [elementwise_spectrum(self._diag[n], mean[n], base_precision) for n in spec if n is not None]
            else:
                parts.append(part)
        parts += [elementwise_spectrum(self._diag[n], mean[n], base_precision) for n in elementwise]
        return spectrum_total(parts)

    def with_base_precision(self, old: float, new: float) -> KronGaussian:
        """The same mean with the isotropic base precision ``old`` replaced by ``new``: ``D' = (D − old)₊ + new``
        (the terms are kept)."""
        old, new = check_real(old, "old", low=0.0), check_real(new, "new", low=0.0, low_open=True)
        diag = {n: (d - old).clamp_min(0) + new for n, d in self._diag.items()}
        return KronGaussian(self.mean, self._layers, self.terms, diag)

    def to_dense(self) -> tuple[list[str], Tensor]:
        """Dense ``Λ`` in the order of each layer's row-major ``vec(W̃)`` then the other parameters (tests only)."""
        order, blocks = list(self._layers), [self.block(layer).dense() for layer in self._layers]
        for n in self._eta:
            if n not in self._owned():
                order.append(n)
                blocks.append(torch.diag(self._diag_full(n).reshape(-1)))
        return order, torch.block_diag(*blocks)
