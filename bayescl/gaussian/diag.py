"""Mean-field Gaussian over a model's named parameters, held in natural parameters.

A :class:`DiagGaussian` is ``q(θ) = Π_j N(θ_j; μ_j, 1/λ_j)`` over every scalar ``j`` of every named parameter.
It stores the natural parameters ``η = λ ⊙ μ`` and ``λ`` (both ``dict[str, Tensor]`` of the parameters'
shapes), so that the algebra of a posterior server is plain addition:

* product ``q1 · q2``: ``(η1 + η2, λ1 + λ2)``; division ``q1 / q2``: ``(η1 − η2, λ1 − λ2)``;
* tempering / damping ``q^α``: ``(α η, α λ)``.

A *site* (the contribution of one task) may have ``λ_j = 0`` on some entries; such an object is *improper*
and has no mean, variance, sample, density or KL (those raise a ``ValueError`` naming the parameter), but it can
be multiplied, divided, tempered, and its quadratic term used as a regulariser. A *signed* site may even have
``λ_j < 0`` (a variational posterior that is wider than its prior in some direction: the VCL site
``q_t / q_{t−1}``); it is built with ``signed=True`` or ``divide(..., allow_negative=True)`` and is only ever used
inside a product that is proper.

>>> import torch
>>> q = DiagGaussian.from_mean_precision({"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])})
>>> (q * q).mean["w"], (q * q).precision["w"]
(tensor([1.]), tensor([8.]))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from bayescl._checks import as_enum, check_positive_int, check_real
from bayescl.gaussian.diag_kl import add_diag_gaussian_kl_grad_, diag_gaussian_kl
from bayescl.gaussian.tensors import (
    ROUND_TOL,
    MeanInit,
    Params,
    check_known,
    check_new_shapes,
    check_same_names,
    check_state_kind,
    check_tensors,
    first_dtype_device,
    initial_mean,
    named_tensors,
    nonneg_precision,
)

#: names other modules import from here (their homes: :mod:`~bayescl.gaussian.tensors`, ``diag_kl``)
__all__ = ["ROUND_TOL", "DiagGaussian", "MeanInit", "Params", "add_diag_gaussian_kl_grad_", "check_same_names",
           "check_tensors", "diag_gaussian_kl", "elementwise_spectrum", "named_tensors"]


def elementwise_spectrum(precision: Tensor, mean: Tensor, base: float) -> tuple[Tensor, float]:
    """The data part ``h = (λ − base)₊`` of an elementwise precision where it is ``> 0`` (float64, flat) and
    ``‖μ‖²`` over those entries: one parameter's share of :meth:`DiagGaussian.data_spectrum`."""
    h = (precision.double().expand(mean.shape) - base).clamp_min(0).reshape(-1)
    keep = h > 0
    return h[keep], float((mean.double().reshape(-1)[keep] ** 2).sum())


def spectrum_total(parts: list[tuple[Tensor, float]]) -> tuple[Tensor, float]:
    """Concatenate ``(eigenvalues, squared norm)`` parts (an empty float64 tensor when there are none)."""
    eigs = [e for e, _ in parts]
    return (torch.cat(eigs) if eigs else torch.zeros(0, dtype=torch.float64)), sum(s for _, s in parts)


class DiagGaussian:
    """Mean-field Gaussian ``N(μ, diag(λ)⁻¹)`` over named parameters, stored as naturals ``(η = λ μ, λ)``.

    Args:
        eta: name -> ``λ ⊙ μ``.
        precision: name -> ``λ`` (finite, ``>= 0``), same names, shapes, dtype and device as ``eta``.
        signed: allow ``λ < 0`` (a signed site, see the module docstring).
    """

    kind = "diag"

    def __init__(self, eta: Mapping[str, Tensor], precision: Mapping[str, Tensor], *, signed: bool = False) -> None:
        eta, precision = dict(eta), dict(precision)
        check_same_names(eta, precision, "precision")
        ref = check_tensors(eta, "eta")
        check_tensors(precision, "precision", ref)
        for n, p in precision.items():
            if not signed and bool((p < 0).any()):
                raise ValueError(f"precision[{n!r}] has negative entries (min {float(p.min()):.3g}); it must be >= 0 "
                                 "(pass signed=True for a site that may have negative precision).")
        self._eta = {n: t.detach() for n, t in eta.items()}
        self._prec = {n: precision[n].detach() for n in eta}

    @classmethod
    def _trusted(cls, eta: dict[str, Tensor], precision: dict[str, Tensor]) -> DiagGaussian:
        out = cls.__new__(cls)
        out._eta, out._prec = eta, precision
        return out

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mean_precision(cls, mean: Mapping[str, Tensor], precision: Mapping[str, Tensor]) -> DiagGaussian:
        """Build from the mean ``μ`` and the elementwise precision ``λ``: ``η = λ μ``."""
        check_same_names(dict(mean), dict(precision), "precision")
        check_tensors(mean, "mean")
        return cls({n: precision[n] * m for n, m in mean.items()}, precision)

    @classmethod
    def from_moments(cls, mean: Mapping[str, Tensor], variance: Mapping[str, Tensor]) -> DiagGaussian:
        """Build from the mean and the elementwise variance ``σ² > 0``: ``λ = 1/σ²``."""
        check_same_names(dict(mean), dict(variance), "variance")
        check_tensors(variance, "variance")
        for n, v in variance.items():
            if bool((v <= 0).any()):
                raise ValueError(f"variance[{n!r}] has entries <= 0 (min {float(v.min()):.3g}); it must be > 0.")
        return cls.from_mean_precision(mean, {n: 1.0 / v for n, v in variance.items()})

    @classmethod
    def isotropic(cls, params: Params, precision: float, mean: MeanInit | str = "zeros") -> DiagGaussian:
        """The prior ``N(μ0, I/precision)`` with ``μ0 = 0`` (``"zeros"``) or the current values (``"current"``)."""
        p = check_real(precision, "precision", low=0.0, low_open=True)
        init = as_enum(MeanInit, mean, "mean")
        tensors = named_tensors(params)
        check_tensors(tensors, "params")
        prec = {n: torch.full_like(t, p) for n, t in tensors.items()}
        eta = {n: p * initial_mean(t, init) for n, t in tensors.items()}
        return cls._trusted(eta, prec)

    @classmethod
    def zeros_like(cls, params: Params) -> DiagGaussian:
        """The empty site: ``η = 0``, ``λ = 0`` (the identity of the product)."""
        tensors = named_tensors(params)
        check_tensors(tensors, "params")
        return cls._trusted({n: torch.zeros_like(t) for n, t in tensors.items()},
                            {n: torch.zeros_like(t) for n, t in tensors.items()})

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._eta)

    @property
    def eta(self) -> dict[str, Tensor]:
        return dict(self._eta)

    @property
    def precision(self) -> dict[str, Tensor]:
        return dict(self._prec)

    def _require_proper(self, what: str) -> None:
        for n, p in self._prec.items():
            if bool((p <= 0).any()):
                raise ValueError(
                    f"{what} needs a proper Gaussian but parameter {n!r} has precision <= 0 on "
                    f"{int((p <= 0).sum())} of {p.numel()} entries (an improper or signed site)."
                )

    @property
    def mean(self) -> dict[str, Tensor]:
        """``μ = η / λ`` (raises on an improper Gaussian)."""
        self._require_proper("mean")
        return {n: self._eta[n] / self._prec[n] for n in self._eta}

    @property
    def variance(self) -> dict[str, Tensor]:
        """``σ² = 1 / λ`` (raises on an improper Gaussian)."""
        self._require_proper("variance")
        return {n: 1.0 / p for n, p in self._prec.items()}

    @property
    def is_signed(self) -> bool:
        """Whether some precision entry is negative (a signed site)."""
        return any(bool((p < 0).any()) for p in self._prec.values())

    def is_proper(self) -> bool:
        return all(bool((p > 0).all()) for p in self._prec.values())

    def __len__(self) -> int:
        return sum(t.numel() for t in self._eta.values())

    def num_floats(self) -> int:
        """Floats stored (``η`` and ``λ``)."""
        return 2 * len(self)

    def __contains__(self, name: object) -> bool:
        return name in self._eta

    def __repr__(self) -> str:
        return f"DiagGaussian({len(self._eta)} parameters, {len(self)} scalars)"

    # ------------------------------------------------------------------ algebra
    def _check_other(self, other: object, op: str) -> DiagGaussian:
        if not isinstance(other, DiagGaussian):
            raise TypeError(f"{op} needs another DiagGaussian, got {type(other).__name__}.")
        check_same_names(self._eta, other._eta, "other")
        return other

    def __mul__(self, other: DiagGaussian) -> DiagGaussian:
        """Product of densities: natural parameters add."""
        other = self._check_other(other, "product")
        return DiagGaussian._trusted({n: t + other._eta[n] for n, t in self._eta.items()},
                                     {n: t + other._prec[n] for n, t in self._prec.items()})

    def divide(self, other: DiagGaussian, allow_improper: bool = False, allow_negative: bool = False) -> DiagGaussian:
        """Quotient ``self / other``: natural parameters subtract.

        Raises ``ValueError`` naming the first parameter whose resulting precision is ``<= 0`` (or, with
        ``allow_improper=True``, ``< 0`` beyond rounding: ``|λ| <= 1e-9 λ_self`` is set to 0). With
        ``allow_negative=True`` the result is a signed site and negative entries are kept.
        """
        other = self._check_other(other, "division")
        prec = {}
        for n, p in self._prec.items():
            diff = p - other._prec[n]
            if allow_negative:
                prec[n] = torch.where(diff.abs() <= ROUND_TOL * p.abs(), torch.zeros_like(diff), diff)
            else:
                prec[n] = nonneg_precision(diff, p, n, "division", allow_improper)
        return DiagGaussian._trusted({n: t - other._eta[n] for n, t in self._eta.items()}, prec)

    def __truediv__(self, other: DiagGaussian) -> DiagGaussian:
        return self.divide(other)

    def with_mean(self, mean: Params) -> DiagGaussian:
        """The Gaussian with the same precision re-centred on ``mean``: ``η = Λ ⊙ mean``."""
        mu = named_tensors(mean, "mean")
        check_same_names(self._eta, mu, "mean")
        return DiagGaussian._trusted({n: self._prec[n] * mu[n].to(self._prec[n]) for n in self._eta},
                                     dict(self._prec))

    def temper(self, alpha: float) -> DiagGaussian:
        """``q^α``: natural parameters scaled by ``α >= 0`` (tempering, damping, ``α = 0`` gives the empty site)."""
        a = check_real(alpha, "alpha", low=0.0)
        return DiagGaussian._trusted({n: a * t for n, t in self._eta.items()},
                                     {n: a * t for n, t in self._prec.items()})

    def __pow__(self, alpha: float) -> DiagGaussian:
        return self.temper(alpha)

    # ------------------------------------------------------------------ densities
    def kl(self, other: DiagGaussian) -> Tensor:
        """``KL(self || other) = ½ Σ_j [λq/λp + λq (μp − μq)² − 1 + log λp − log λq]`` (p = self, q = other)."""
        other = self._check_other(other, "kl")
        self._require_proper("kl")
        other._require_proper("kl (other)")
        mp, mq = self.mean, other.mean
        dtype, device = first_dtype_device(self._eta)
        total = torch.zeros((), dtype=dtype, device=device)
        for n, lp in self._prec.items():
            total = total + diag_gaussian_kl(mp[n], -torch.log(lp), mq[n], other._prec[n])
        return total

    def log_prob(self, params: Params) -> Tensor:
        """``log q(θ) = Σ_j [−½ λ_j (θ_j − μ_j)² + ½ log λ_j − ½ log 2π]`` (differentiable in ``θ``)."""
        theta = named_tensors(params, "params", detach=False)
        check_same_names(self._eta, theta, "params")
        self._require_proper("log_prob")
        mu = self.mean
        total = 0.0
        for n, lam in self._prec.items():
            total = total + (-0.5 * lam * (theta[n] - mu[n]) ** 2 + 0.5 * torch.log(lam)).sum()
        return total - 0.5 * len(self) * math.log(2 * math.pi)

    def sample(self, n: int | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draw ``θ = μ + ε / √λ``, ``ε ~ N(0, I)``; shape ``(n, *shape)`` when ``n`` is given."""
        if n is not None:
            check_positive_int(n, "n")
        self._require_proper("sample")
        mu, var = self.mean, self.variance
        lead = () if n is None else (n,)
        return {k: m + var[k].sqrt() * torch.randn(lead + tuple(m.shape), generator=generator,
                                                       dtype=m.dtype, device=m.device) for k, m in mu.items()}

    def quadratic(self, params: Params) -> Tensor:
        """``½ Σ λ (θ − μ̃)² − Σ_{λ=0} η θ`` with ``μ̃ = η/λ`` where ``λ > 0`` (0 elsewhere).

        For a proper Gaussian this is ``½ (θ−μ)ᵀ Λ (θ−μ) = −log q(θ) + const``; for an improper site it is the
        same up to a constant, ``>= 0`` where ``η = 0`` on the zero-precision entries, and its gradient is
        always :meth:`quadratic_grad` ``= Λ θ − η``. Differentiable in ``θ``.
        """
        theta = named_tensors(params, "params", detach=False)
        check_same_names(self._eta, theta, "params")
        total = 0.0
        for n, lam in self._prec.items():
            eta, th = self._eta[n], theta[n]
            pos = lam > 0
            mu = torch.where(pos, eta / torch.where(pos, lam, torch.ones_like(lam)), torch.zeros_like(eta))
            total = total + 0.5 * (lam * (th - mu) ** 2).sum() - (torch.where(pos, 0.0, eta) * th).sum()
        return total if isinstance(total, Tensor) else torch.zeros(())

    @torch.no_grad()
    def quadratic_grad(self, params: Params) -> dict[str, Tensor]:
        """``Λ θ − η`` per parameter (no autograd): the gradient of :meth:`quadratic`, to add to ``.grad``."""
        theta = named_tensors(params)
        check_same_names(self._eta, theta, "params")
        return {n: lam * theta[n] - self._eta[n] for n, lam in self._prec.items()}

    # ------------------------------------------------------------------ structure
    def restrict(self, names: Iterable[str]) -> DiagGaussian:
        """The marginal over ``names`` (in the given order); ``KeyError`` naming the first unknown one."""
        names = check_known(names, self._eta)
        return DiagGaussian._trusted({n: self._eta[n] for n in names}, {n: self._prec[n] for n in names})

    def extend(self, params: Params, precision: float, mean: MeanInit | str = "current") -> DiagGaussian:
        """Add the parameters of ``params`` not present yet, with isotropic ``precision >= 0``.

        Their mean is the given tensors (``"current"``) or 0; parameters already present are left unchanged
        (their shape must match). This is how heads that appear later get the base prior (``precision > 0``) or an
        empty site entry (``precision = 0``).
        """
        p = check_real(precision, "precision", low=0.0)
        init = as_enum(MeanInit, mean, "mean")
        tensors = named_tensors(params)
        check_new_shapes(tensors, self._eta)
        dtype, device = first_dtype_device(self._eta)
        eta, prec = dict(self._eta), dict(self._prec)
        for n, t in tensors.items():
            if n not in eta:
                t = t.to(device=device, dtype=dtype)
                prec[n] = torch.full_like(t, p)
                eta[n] = p * initial_mean(t, init)
        return DiagGaussian._trusted(eta, prec)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiagGaussian:
        return DiagGaussian._trusted({n: t.to(device=device, dtype=dtype) for n, t in self._eta.items()},
                                     {n: t.to(device=device, dtype=dtype) for n, t in self._prec.items()})

    # ------------------------------------------------------------------ the interface both kinds share
    @property
    def layers(self) -> dict[str, tuple[str, str | None]]:
        """The Kronecker-factored layers: none (every parameter is elementwise)."""
        return {}

    def blocks(self) -> dict[str, Any]:
        """The per-layer Kronecker blocks (:class:`~bayescl.gaussian.kron_block.KronBlock`): none."""
        return {}

    def elementwise_precision(self) -> dict[str, Tensor]:
        """The elementwise part of ``Λ`` per parameter, in the parameter's shape: here all of ``Λ``, ``λ``."""
        return dict(self._prec)

    def precision_diagonal(self) -> dict[str, Tensor]:
        """The diagonal of ``Λ`` per parameter, in the parameter's shape: here all of ``Λ``, ``λ``."""
        return dict(self._prec)

    def data_spectrum(self, base_precision: float) -> tuple[Tensor, float]:
        """``(h, ‖μ‖²)``: the eigenvalues ``h_j = λ_j − τ₀ > 0`` of the data part ``H = Λ − τ₀ I`` (float64) and
        ``Σ μ_j²`` over those entries (the entries the data never touched are left out); see
        :mod:`bayescl.methods.marglik`."""
        mean = self.mean
        return spectrum_total([elementwise_spectrum(p, mean[n], base_precision) for n, p in self._prec.items()])

    def with_base_precision(self, old: float, new: float) -> DiagGaussian:
        """The same mean with the isotropic base precision ``old`` replaced by ``new``: ``λ' = (λ − old)₊ + new``."""
        old, new = check_real(old, "old", low=0.0), check_real(new, "new", low=0.0, low_open=True)
        return DiagGaussian.from_mean_precision(self.mean,
                                                {n: (p - old).clamp_min(0) + new for n, p in self._prec.items()})

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """``{"kind": "diag", "eta": {...}, "precision": {...}}`` (plain dicts of tensors; ``"signed": True``
        added for a signed site)."""
        out: dict[str, Any] = {"kind": self.kind, "eta": dict(self._eta), "precision": dict(self._prec)}
        if self.is_signed:
            out["signed"] = True
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> DiagGaussian:
        state = check_state_kind(state, cls.kind, cls.__name__)
        return cls(state["eta"], state["precision"], signed=bool(state.get("signed", False)))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load in place; raises ``ValueError`` naming the first parameter whose name or shape differs."""
        new = DiagGaussian.from_state_dict(state)
        check_same_names(self._eta, new._eta, "state")
        self._eta, self._prec = new._eta, new._prec
