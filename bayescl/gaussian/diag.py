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

import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bayescl._checks import as_enum, check_positive_int, check_real

Params = Mapping[str, Tensor] | nn.Module

#: Relative tolerance below which a negative precision produced by a subtraction is taken as rounding (-> 0).
ROUND_TOL = 1e-9


class MeanInit(str, enum.Enum):
    """Where the mean of an isotropic Gaussian comes from."""

    ZEROS = "zeros"
    CURRENT = "current"


def named_tensors(params: Params, name: str = "params", *, detach: bool = True) -> dict[str, Tensor]:
    """Return ``params`` as an ordered ``dict`` name -> tensor.

    Args:
        params: an ``nn.Module`` (its ``named_parameters()`` with ``requires_grad``) or a mapping name -> Tensor.
        name: the argument name used in error messages.
        detach: detach the tensors (keep ``False`` when the result must stay differentiable).
    """
    if isinstance(params, nn.Module):
        items = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    elif isinstance(params, Mapping):
        items = list(params.items())
    else:
        raise TypeError(f"{name} must be an nn.Module or a mapping name -> Tensor, got {type(params).__name__}.")
    out: dict[str, Tensor] = {}
    for n, t in items:
        if not isinstance(n, str) or not isinstance(t, Tensor):
            raise TypeError(f"{name} must map str -> Tensor; entry {n!r} is {type(t).__name__}.")
        out[n] = t.detach() if detach else t
    return out


def check_same_names(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "other") -> None:
    """Raise ``ValueError`` naming the first parameter that is missing on one side or has another shape."""
    for n, t in a.items():
        if n not in b:
            raise ValueError(f"parameter {n!r} is in self but not in {what}; both must hold the same parameters.")
        if tuple(b[n].shape) != tuple(t.shape):
            raise ValueError(
                f"parameter {n!r} has shape {tuple(t.shape)} in self but {tuple(b[n].shape)} in {what}; "
                "shapes must match."
            )
    for n in b:
        if n not in a:
            raise ValueError(f"parameter {n!r} is in {what} but not in self; both must hold the same parameters.")


def check_tensors(tensors: Mapping[str, Tensor], what: str, ref: Tensor | None = None) -> Tensor | None:
    """Check that all tensors are floating, finite and share dtype/device (with ``ref`` if given)."""
    for n, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{what}[{n!r}] must be a floating-point Tensor, got {getattr(t, 'dtype', type(t))}.")
        if ref is None:
            ref = t
        if t.dtype != ref.dtype:
            raise ValueError(f"{what}[{n!r}] has dtype {t.dtype} but other tensors have {ref.dtype}; use one dtype.")
        if t.device != ref.device:
            raise ValueError(
                f"{what}[{n!r}] is on device {t.device} but other tensors are on {ref.device}; use one device."
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}[{n!r}] contains non-finite values; all entries must be finite.")
    return ref


def _nonneg_precision(prec: Tensor, ref: Tensor, name: str, what: str, allow_zero: bool) -> Tensor:
    """Clamp rounding-level negatives of a subtracted precision to 0; raise on real negatives (or zeros)."""
    tol = ROUND_TOL * ref.abs()
    if bool((prec < -tol).any()):
        raise ValueError(
            f"{what}: parameter {name!r} would get negative precision (min {float(prec.min()):.3g}); "
            "the divisor must not hold more precision than the dividend."
        )
    prec = torch.where(prec.abs() <= tol, torch.zeros_like(prec), prec)
    if not allow_zero and bool((prec <= 0).any()):
        raise ValueError(
            f"{what}: parameter {name!r} would get precision <= 0 on {int((prec <= 0).sum())} entries; "
            "the result must be proper (pass allow_improper=True to keep an improper site)."
        )
    return prec


def diag_gaussian_kl(mu: Tensor, logvar: Tensor, prior_mean: Tensor, prior_precision: Tensor) -> Tensor:
    r"""``KL(N(μ, e^ℓ) || N(μ_p, 1/λ_p))`` summed over entries, differentiable in ``μ`` and ``ℓ``:
    ``½ Σ [λ_p e^ℓ + λ_p (μ − μ_p)² − 1 − log λ_p − ℓ]`` (the one elementwise Gaussian KL: DiagGaussian.kl and the
    variational layers both use it)."""
    return 0.5 * (prior_precision * (logvar.exp() + (mu - prior_mean) ** 2) - 1.0
                  - torch.log(prior_precision) - logvar).sum()


@torch.no_grad()
def add_diag_gaussian_kl_grad_(mu: Tensor, logvar: Tensor, prior_mean: Tensor, prior_precision: Tensor,
                               scale: float = 1.0, log_precision_sum: Tensor | None = None) -> Tensor:
    r"""Add ``scale · ∇ KL(N(μ, e^ℓ) || N(μ_p, 1/λ_p))`` to ``mu.grad`` and ``logvar.grad`` (zeros where ``None``)
    in closed form, :math:`\nabla_\mu = \lambda_p(\mu - \mu_p)`, :math:`\nabla_\ell = \tfrac12(\lambda_p e^\ell - 1)`,
    and return the KL itself (unscaled; the value of :func:`diag_gaussian_kl`).

    Fewer passes over the weights than autograd through :func:`diag_gaussian_kl`. ``log_precision_sum`` is
    ``Σ log λ_p`` when the caller keeps it per prior (it is computed otherwise).
    """
    for p in (mu, logvar):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    diff, var = mu - prior_mean, logvar.exp()
    mu.grad.addcmul_(prior_precision, diff, value=scale)
    logvar.grad.addcmul_(prior_precision, var, value=0.5 * scale).sub_(0.5 * scale)
    if log_precision_sum is None:
        log_precision_sum = torch.log(prior_precision).sum()
    quad = torch.dot(prior_precision.reshape(-1), (var + diff * diff).reshape(-1))
    return 0.5 * (quad - logvar.sum() - mu.numel() - log_precision_sum)


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
        eta = {n: (p * t.clone() if init is MeanInit.CURRENT else torch.zeros_like(t)) for n, t in tensors.items()}
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
                prec[n] = _nonneg_precision(diff, p, n, "division", allow_improper)
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
        total = torch.zeros((), dtype=self._dtype(), device=self._device())
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
        names = list(names)
        for n in names:
            if n not in self._eta:
                raise KeyError(f"parameter {n!r} is not in this Gaussian; known: {', '.join(self._eta)}.")
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
        eta, prec = dict(self._eta), dict(self._prec)
        for n, t in tensors.items():
            if n in eta:
                if tuple(t.shape) != tuple(eta[n].shape):
                    raise ValueError(f"parameter {n!r} has shape {tuple(t.shape)} in params but "
                                     f"{tuple(eta[n].shape)} in self; shapes must match.")
                continue
            t = t.to(device=self._device(), dtype=self._dtype())
            prec[n] = torch.full_like(t, p)
            eta[n] = p * t.clone() if init is MeanInit.CURRENT else torch.zeros_like(t)
        return DiagGaussian._trusted(eta, prec)

    def _dtype(self) -> torch.dtype:
        return next(iter(self._eta.values())).dtype if self._eta else torch.get_default_dtype()

    def _device(self) -> torch.device:
        return next(iter(self._eta.values())).device if self._eta else torch.device("cpu")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiagGaussian:
        return DiagGaussian._trusted({n: t.to(device=device, dtype=dtype) for n, t in self._eta.items()},
                                     {n: t.to(device=device, dtype=dtype) for n, t in self._prec.items()})

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
        if not isinstance(state, Mapping) or state.get("kind") != cls.kind:
            got = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state kind={got!r} cannot be loaded into DiagGaussian; expected 'diag'.")
        return cls(state["eta"], state["precision"], signed=bool(state.get("signed", False)))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load in place; raises ``ValueError`` naming the first parameter whose name or shape differs."""
        new = DiagGaussian.from_state_dict(state)
        check_same_names(self._eta, new._eta, "state")
        self._eta, self._prec = new._eta, new._prec
