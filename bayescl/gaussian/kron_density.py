"""Densities of a :class:`~bayescl.gaussian.kron.KronGaussian`: ``log det Λ``, KL, the quadratic form and its
gradient, ``log_prob`` and sampling, block by block through :meth:`KronBlock.factor
<bayescl.gaussian.kron_block.KronBlock.factor>` (exact, or the merged-pair approximation for a large block with
several terms; see :mod:`bayescl.gaussian.kron`).

:class:`KronDensities` sits between the storage (:class:`~bayescl.gaussian.kron_store.KronStore`) and
:class:`~bayescl.gaussian.kron.KronGaussian`, which adds the constructors and the algebra.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from bayescl._checks import check_positive_int
from bayescl.gaussian.kron_block import BlockFactor, LayerSpec, block_shape, from_block
from bayescl.gaussian.kron_store import KronStore
from bayescl.gaussian.tensors import Params, check_same_names, first_dtype_device, named_tensors


class KronDensities(KronStore):
    """``logdet``, ``kl``, ``quadratic``, ``quadratic_grad``, ``log_prob`` and ``sample`` of a KronGaussian."""

    def _factors(self, approx: bool = True) -> Iterator[tuple[str, LayerSpec | None, BlockFactor | None]]:
        """Yield ``(layer, spec, factor)`` per layer; a diag-only parameter comes as ``(name, None, None)``."""
        owned = self._owned()
        for n in self._eta:
            if n not in owned:
                yield n, None, None
        for layer, spec in self._layers.items():
            yield layer, spec, self.block(layer).factor(approx)

    def _zero(self) -> Tensor:
        dtype, device = first_dtype_device(self._diag)
        return torch.zeros((), dtype=dtype, device=device)

    def logdet(self) -> Tensor:
        """``log det Λ`` (exact or approximated per block, see the module docstring)."""
        self._require_diag_proper("logdet")
        total = self._zero()
        for key, _, f in self._factors():
            total = total + (torch.log(self._diag_full(key)).sum() if f is None else f.logdet())
        return total

    def kl(self, other: Any) -> Tensor:
        """``KL(p || q) = ½ [tr(Λq Σp) + (μq−μp)ᵀ Λq (μq−μp) − n + log det Λp − log det Λq]`` (p = self)."""
        layers, _ = self._aligned(other, "kl")
        p, q = self._relayer(layers), other._relayer(layers)
        mp, mq = p.mean, q.mean
        d = {n: mq[n] - mp[n] for n in mp}
        quad = sum((v * d[n]).sum() for n, v in q._matvec(d).items())
        tr = self._zero()
        for key, _, f in p._factors():
            tr = tr + ((q._diag_full(key) / p._diag_full(key)).sum() if f is None else f.trace_with(q.block(key)))
        return 0.5 * (tr + quad - len(self) + p.logdet() - q.logdet())

    def _relayer(self, layers: dict) -> Any:
        return self._trusted(self._eta, layers, {k: self._terms.get(k, {}) for k in layers}, self._diag,
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
        """``Λ θ − η`` per parameter (``Σ s_i G_i W̃ A_i + D ⊙ W̃ − η̃`` per layer), no autograd, no solve.

        Computed like ``η``, in float64, and returned in ``θ``'s dtype: zero at :attr:`mean`. (In float32,
        ``Λθ`` and ``η`` nearly cancel there and their rounding, ``1e-7`` of ``|Λ||θ|``, would be all that is
        left.) The fused :class:`~bayescl.gaussian.prior_gradient.PriorGradient` of training gives the same
        numbers up to that rounding."""
        theta = named_tensors(params)
        check_same_names(self._eta, theta, "params")
        return {n: (v - self._eta[n]).to(theta[n].dtype) for n, v in self._matvec(theta, wide=True).items()}

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
        dtype, device = first_dtype_device(self._diag)
        kw = {"dtype": dtype, "device": device, "generator": generator}
        out = {}
        for key, spec, f in self._factors():
            if f is None:
                out[key] = mu[key] + torch.randn(lead + tuple(mu[key].shape), **kw) / self._diag_full(key).sqrt()
                continue
            x = f.sample(lead, block_shape(spec, mu), **kw)
            out.update({k: mu[k] + v for k, v in from_block(spec, x, mu).items()})
        return {k: out[k] for k in self._eta}
