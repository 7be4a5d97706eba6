"""Storage of a :class:`~bayescl.gaussian.kron.KronGaussian`: its parts checked when a user builds one, the views
of them, the per-layer blocks, the structured product ``Λ x``, the mean ``μ = Λ⁻¹ η`` and persistence.

A KronGaussian holds, in natural parameters,

* ``eta``: parameter name -> ``η = Λ μ``, in float64 (:func:`~bayescl.gaussian.kron_block.wide_dtype`) whatever
  the parameters' dtype: a Kronecker block's condition number reaches ``1e9`` (a weak base prior under a strong
  curvature), so a float32 ``η`` would not hold the mean's components in the flat directions. It is computed
  from the float64-cast mean and factors (:meth:`KronStore._matvec` with ``wide``), products, quotients and
  tempering add, subtract and scale it in float64, and the mean is solved from it in float64, as the exact
  inverse of the same matrix (:meth:`KronBlock.solve <bayescl.gaussian.kron_block.KronBlock.solve>`), so the
  mean of a Laplace posterior is the weights it was built at and :meth:`quadratic_grad` vanishes there. The
  public :attr:`KronStore.eta` is in the parameters' dtype (that of ``diag``);
* ``layers``: layer name -> ``(weight name, bias name or None)``, every parameter in at most one layer;
* ``terms``: layer name -> ``{tag: KronTerm}`` (the same tag means the same factors), each factor made exactly
  symmetric when it enters (:func:`~bayescl.gaussian.kron_terms.symmetric`: a float32 ``Xᵀ X`` is symmetric only
  up to rounding, which the mean solve, reading one triangle, would amplify);
* ``diag``: parameter name -> ``D`` (0-dim, isotropic, or the parameter's shape), ``>= 0``;
* ``mean``: the cached ``μ`` (or ``None`` until it is solved).

:class:`KronStore` is the base class of :class:`~bayescl.gaussian.kron_density.KronDensities` and
:class:`~bayescl.gaussian.kron.KronGaussian`; it is not meant to be used on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from bayescl._checks import check_real
from bayescl.gaussian.kron_block import (
    KronBlock,
    LayerSpec,
    apply_terms,
    block_shape,
    from_block,
    to_block,
    wide_dtype,
    widen,
)
from bayescl.gaussian.kron_terms import KronTerm, new_tag, symmetric
from bayescl.gaussian.tensors import check_same_names, check_state_kind, check_tensors

Layers = dict[str, LayerSpec]
LayerParams = Mapping[str, LayerSpec]
Terms = dict[str, dict[str, KronTerm]]

#: the optional tensors of a term, persisted when present
_OPTIONAL = ("UA", "UG", "dA", "dG")


def check_layers(layer_params: Mapping[str, Any], mean: Mapping[str, Tensor]) -> Layers:
    """``layer_params`` as a dict, each ``(weight, bias | None)`` naming parameters of ``mean`` (a weight with
    ``>= 2`` dims, a bias of shape ``(out,)``), no parameter in two layers."""
    layers: Layers = {}
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
    return layers


def check_diag(diag: Mapping[str, Tensor | float] | None, mean: Mapping[str, Tensor], ref: Tensor) -> dict[str, Tensor]:
    """``D`` for every parameter of ``mean`` (missing: 0), each 0-dim or of the parameter's shape, ``>= 0``."""
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
    return dg


def check_terms(terms: Mapping[str, Sequence[KronTerm | tuple]] | None, layers: Layers, mean: Mapping[str, Tensor],
                ref: Tensor) -> Terms:
    """Terms by layer and tag: each a :class:`KronTerm` or ``(A, G[, scale])`` (fresh tags are drawn), with
    ``A`` ``p × p``, ``G`` ``out × out`` and ``scale >= 0``."""
    tms: Terms = {layer: {} for layer in layers}
    for layer, lst in dict(terms or {}).items():
        if layer not in layers:
            raise KeyError(f"terms names layer {layer!r}, which is not in layer_params; known: {list(layers)}.")
        out_dim, p = block_shape(layers[layer], mean)
        for t in lst:
            t = t if isinstance(t, KronTerm) else KronTerm(*t)
            t = replace(t, tag=t.tag or new_tag(),
                        scale=check_real(t.scale, f"scale of a term of layer {layer!r}", low=0.0))
            if tuple(t.A.shape) != (p, p) or tuple(t.G.shape) != (out_dim, out_dim):
                raise ValueError(f"layer {layer!r}: factors A {tuple(t.A.shape)} / G {tuple(t.G.shape)}; "
                                 f"expected A ({p}, {p}) and G ({out_dim}, {out_dim}).")
            check_tensors({"A": t.A, "G": t.G}, f"terms[{layer!r}]", ref)
            tms[layer][t.tag] = replace(t, A=symmetric(t.A.detach()), G=symmetric(t.G.detach()))
    return tms


def terms_to_state(terms: Terms) -> dict[str, list[dict[str, Any]]]:
    """Terms as plain lists of dicts of tensors (the ``"terms"`` entry of a ``state_dict``)."""
    return {k: [{"A": t.A, "G": t.G, "scale": t.scale, "tag": t.tag, **{o: getattr(t, o) for o in _OPTIONAL}}
                for t in ts.values()]
            for k, ts in terms.items()}


def terms_from_state(state: Mapping[str, Sequence[Mapping[str, Any]]], layers: Layers) -> Terms:
    """The inverse of :func:`terms_to_state` for the given layers (a layer without an entry has no term)."""
    return {k: {d["tag"]: KronTerm(symmetric(d["A"]), symmetric(d["G"]), float(d["scale"]), d["tag"],
                                   *(d.get(o) for o in _OPTIONAL))
                for d in state.get(k, [])}
            for k in layers}


class KronStore:
    """The stored parts of a KronGaussian and what is computed from them alone (see the module docstring)."""

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
        layers = check_layers(layer_params, mean)
        self._layers, self._diag = layers, check_diag(diag, mean, ref)
        self._terms = check_terms(terms, layers, mean, ref)
        self._eta = {n: t.detach() for n, t in self._matvec(mean, wide=True).items()}
        self._mean: dict[str, Tensor] | None = mean

    @classmethod
    def _trusted(cls, eta, layers, terms, diag, mean=None) -> Any:
        """Assemble without checks; ``η`` is widened to float64 here (a no-op when it is already, a conversion
        for a ``state_dict`` saved with a float32 ``η``)."""
        out = cls.__new__(cls)
        out._eta = {n: widen(t) for n, t in eta.items()}
        out._layers, out._terms, out._diag, out._mean = layers, terms, diag, mean
        return out

    # ------------------------------------------------------------------ views
    def _diag_full(self, n: str) -> Tensor:
        return self._diag[n].expand(self._eta[n].shape)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._eta)

    @property
    def layers(self) -> dict[str, LayerSpec]:
        """The Kronecker-factored layers: layer name -> ``(weight name, bias name or None)``."""
        return dict(self._layers)

    @property
    def terms(self) -> dict[str, list[KronTerm]]:
        return {layer: list(t.values()) for layer, t in self._terms.items()}

    @property
    def diag(self) -> dict[str, Tensor]:
        return dict(self._diag)

    @property
    def eta(self) -> dict[str, Tensor]:
        """``η = Λ μ`` in the parameters' dtype (it is held in float64; see the module docstring)."""
        return {n: v.to(self._diag[n].dtype) for n, v in self._eta.items()}

    @property
    def num_terms(self) -> dict[str, int]:
        return {layer: len(t) for layer, t in self._terms.items()}

    def num_floats(self) -> int:
        """Floats of the parameters' dtype stored: ``η`` (float64, so twice its entries for float32 parameters),
        ``D``, every term's ``A`` and ``G``, and the cached mean."""
        n = sum(t.numel() * t.element_size() // self._diag[k].element_size() for k, t in self._eta.items())
        n += sum(d.numel() for d in self._diag.values())
        n += sum(t.A.numel() + t.G.numel() for ts in self._terms.values() for t in ts.values())
        return n + (sum(t.numel() for t in self._mean.values()) if self._mean is not None else 0)

    def __len__(self) -> int:
        return sum(t.numel() for t in self._eta.values())

    def __contains__(self, name: object) -> bool:
        return name in self._eta

    def __repr__(self) -> str:
        return f"KronGaussian({len(self._eta)} parameters, layers {self.num_terms})"

    def block(self, layer: str) -> KronBlock:
        """The precision of ``layer``'s block ``W̃`` (its ``D`` in block form and its terms)."""
        if layer not in self._layers:
            raise KeyError(f"layer {layer!r} is not a Kronecker layer of this Gaussian; known: {list(self._layers)}.")
        spec = self._layers[layer]
        diag = to_block(spec, {n: self._diag_full(n) for n in spec if n is not None})
        return KronBlock(layer, spec, diag, list(self._terms[layer].values()), self.DENSE_LIMIT)

    def blocks(self) -> dict[str, KronBlock]:
        """:meth:`block` of every layer, in layer order."""
        return {layer: self.block(layer) for layer in self._layers}

    # ------------------------------------------------------------------ structured linear algebra
    def _matvec(self, x: Mapping[str, Tensor], wide: bool = False) -> dict[str, Tensor]:
        """``Λ x`` without materialising ``Λ`` (autograd-friendly). With ``wide``, in float64: ``x``, ``D`` and the
        factors cast (:meth:`KronTerm.exact <bayescl.gaussian.kron_terms.KronTerm.exact>`), the matrix ``η`` is
        computed with and the mean solved with (:meth:`KronBlock.solve
        <bayescl.gaussian.kron_block.KronBlock.solve>`)."""
        if wide:
            x = {n: widen(t) for n, t in x.items()}
        diag = {n: widen(d) for n, d in self._diag.items()} if wide else self._diag
        out = {n: diag[n] * t for n, t in x.items()}
        for layer, spec in self._layers.items():
            if self._terms[layer]:
                ts = self._terms[layer].values()
                if wide:
                    ts = [t.exact(wide_dtype(t.A.device)) for t in ts]
                kb = apply_terms(ts, to_block(spec, x))
                for n, v in from_block(spec, kb, x).items():
                    out[n] = out[n] + v
        return out

    def _owned(self) -> set[str]:
        return {n for spec in self._layers.values() for n in spec if n is not None}

    def _require_diag_proper(self, what: str) -> None:
        owned = self._owned()
        for n, d in self._diag.items():
            if n not in owned and bool((d <= 0).any()):
                raise ValueError(f"{what} needs a proper Gaussian but parameter {n!r} has zero precision.")

    @property
    def mean(self) -> dict[str, Tensor]:
        """``μ = Λ⁻¹ η`` (cached; raises ``ValueError`` on an improper Gaussian), solved in float64 and returned in
        the parameters' dtype."""
        if self._mean is None:
            self._require_diag_proper("mean")
            mu = {n: self._eta[n] / self._diag[n] for n in self._eta if n not in self._owned()}
            for layer, spec in self._layers.items():
                mu.update(from_block(spec, self.block(layer).solve(to_block(spec, self._eta)), self._eta))
            self._mean = {n: mu[n].to(self._diag[n].dtype) for n in self._eta}
        return dict(self._mean)

    def _aligned(self, other: object, op: str) -> tuple[dict, dict]:
        """Check names/shapes; return the union of both layer maps and the matching term dicts."""
        if not isinstance(other, KronStore):
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

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain nested dicts of tensors, with ``"kind": "kron"`` (``"eta"`` in float64; a state with a float32
        ``"eta"``, saved before it was kept in float64, loads too)."""
        return {"kind": self.kind, "eta": dict(self._eta), "diag": dict(self._diag),
                "layers": {k: tuple(v) for k, v in self._layers.items()}, "terms": terms_to_state(self._terms),
                "mean": None if self._mean is None else dict(self._mean)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Any:
        state = check_state_kind(state, cls.kind, cls.__name__)
        eta = dict(state["eta"])
        check_tensors(eta, "eta")
        layers = {k: (v[0], v[1]) for k, v in state["layers"].items()}
        mean = None if state.get("mean") is None else dict(state["mean"])
        return cls._trusted(eta, layers, terms_from_state(state["terms"], layers), dict(state["diag"]), mean)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load in place; raises ``ValueError`` naming the first parameter whose name or shape differs."""
        new = type(self).from_state_dict(state)
        check_same_names(self._eta, new._eta, "state")
        self._eta, self._layers, self._terms, self._diag, self._mean = (
            new._eta, new._layers, new._terms, new._diag, new._mean)
