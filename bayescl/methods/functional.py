r"""A prior on functions: the Gaussian process a Gaussian weight posterior induces at a few stored inputs (FROMP).

Functional regularisation of the memorable past (Pan et al. 2020). Linearised at the weights :math:`\theta_t^*` that
end task :math:`t`, a weight posterior :math:`\mathcal N(\theta_t^*, \Sigma)` gives the network's outputs at stored
inputs :math:`M_t` the Gaussian

.. math::  f(M_t) \sim \mathcal N\big(m_t,\; K_t\big), \qquad m_t = f(M_t; \theta_t^*), \qquad
           K_t = J \Sigma J^\top,\quad J = \partial f(M_t)/\partial\theta \,\big|_{\theta_t^*}.

As in FROMP the covariance is kept **per output** (class) ``c``: :math:`K_{t,c} = J_c \Sigma J_c^\top` is an
``M × M`` block (the covariances between different outputs are dropped), and :math:`f` is the **softmax** of the
logits (``output="softmax"``, FROMP's choice: bounded, and it only asks the past probabilities to stay; ``"logits"``
regularises the logits instead). While a later task trains, the functional prior term

.. math::  R(\theta) = \tfrac12 \textstyle\sum_t \sum_c (f_c(M_t;\theta) - m_{t,c})^\top
           (K_{t,c} + \epsilon_{t,c} I)^{-1} (f_c(M_t;\theta) - m_{t,c})

is the negative log density of the past tasks' GPs at the current outputs; its gradient
:math:`\sum_{t,c} J_c^\top (K_{t,c}+\epsilon I)^{-1}(f_c - m_{t,c})` is one backward pass through the stored points.
The jitter :math:`\epsilon` is an absolute observation-noise variance on the function (``1e-4``: a standard deviation
of 0.01 on a probability): it bounds every point's precision by :math:`1/\epsilon`. A relative jitter would not:
the softmax output of a class the task never saw is ~0 at its points, so its kernel is ~0 and the term would pin it
there, forbidding later tasks to raise that class anywhere near the old points (class-incremental learning stops).
Each :class:`FunctionalSite` caches the Cholesky factor of its jittered kernel (float64).

**Cost.** ``points_per_step`` bounds the points evaluated per step: each past task gets an equal share
(at least one point), drawn at random; a task with ``M_t`` points of which ``s_t`` are drawn contributes
:math:`\frac{M_t}{s_t}\,\tfrac12 r_S^\top (K_{SS} + \epsilon I)^{-1} r_S`, the GP's **marginal** on the drawn points
(the principal submatrix, factorised per step, ``s_t × s_t``), scaled so that it equals the full term when the
points are uncorrelated. With every point drawn it is the full term with the cached factor.

**Kernel.** :func:`function_kernel` takes per-example Jacobians of one output at a time (``torch.func``: ``vmap`` of
``grad``, ``M × P`` floats per output) and contracts them with :math:`\Sigma`: elementwise for a
:class:`~bayescl.gaussian.diag.DiagGaussian` and for the parameters outside Kronecker blocks; for each block of a
:class:`~bayescl.gaussian.kron.KronGaussian` through its factor (eigen form :math:`Z = U_G^\top J U_A/\sqrt{\ell}`,
or the dense Cholesky factor; a block with several terms that is too large for a dense factor uses the merged-pair
approximation, as :func:`~bayescl.methods.predictive.glm_logit_moments` does). Then :math:`K_c = Z Z^\top`.

**Selection** of the memorable points (:func:`select_memorable`): ``"hessian"`` is FROMP's score
:math:`\operatorname{tr}\Lambda(x) = \sum_c p_c(1-p_c)` (the trace of the softmax output Hessian, largest first,
the same number of points per label); ``"random"`` and ``"kcenter"`` reuse :mod:`bayescl.methods.coresets`.
Models are called as in :mod:`bayescl._batches`: ``model(x)`` or ``model(x, task_id)``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bayescl._batches import move_inputs, split_batch
from bayescl._checks import as_enum, check_positive_int, check_real
from bayescl._params import eval_mode
from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kinds import Gaussian, check_gaussian
from bayescl.gaussian.kron import KronGaussian
from bayescl.methods.coresets import kcenter_coreset, random_coreset


class FunctionOutput(str, enum.Enum):
    """What the functional prior regularises: the softmax probabilities (FROMP) or the logits."""

    SOFTMAX = "softmax"
    LOGITS = "logits"


class MemorySelection(str, enum.Enum):
    """How the memorable points of a task are chosen."""

    HESSIAN = "hessian"
    RANDOM = "random"
    KCENTER = "kcenter"


def function_values(logits: Tensor, num_outputs: int, output: FunctionOutput | str) -> Tensor:
    """The regularised function from logits ``(..., C')``: the first ``num_outputs`` logits (a head that grew since
    keeps its old outputs first), or their softmax."""
    z = logits[..., :num_outputs]
    return torch.softmax(z, dim=-1) if as_enum(FunctionOutput, output, "output") is FunctionOutput.SOFTMAX else z


def hessian_score(logits: Tensor) -> Tensor:
    r"""FROMP's memorability :math:`\operatorname{tr}\Lambda(x) = \sum_c p_c (1 - p_c)`, ``p = softmax(logits)``
    (the trace of the Hessian of the cross-entropy with respect to the logits); ``(B, C) -> (B,)``."""
    p = torch.softmax(logits, dim=-1)
    return (p * (1.0 - p)).sum(-1)


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable[Any]) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """Run ``model`` (eval mode) over ``batches``: ``(inputs, y, score)`` with the inputs and labels concatenated
    and :func:`hessian_score` of every example (tensors on the model's device)."""
    ref, parts = next(model.parameters()), []
    with eval_mode(model):
        for batch in batches:
            inputs, y = move_inputs(*split_batch(batch), ref.device, ref.dtype)
            parts.append((inputs, y, hessian_score(model(*inputs))))
    if not parts:
        raise ValueError("batches is empty: a task needs data to choose its memorable points from.")
    return (tuple(torch.cat([p[0][i] for p in parts]) for i in range(len(parts[0][0]))),
            torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))


def select_memorable(x: Tensor, y: Tensor, score: Tensor, size: int, method: MemorySelection | str = "hessian",
                     generator: torch.Generator | None = None) -> Tensor:
    """Indices of ``size`` memorable points among ``len(x)`` examples.

    Args:
        x: inputs ``(N, ...)`` (``"kcenter"`` covers them in Euclidean distance).
        y: labels ``(N,)``; ``"hessian"`` takes the same number of points per label (as FROMP), the remainder
            going to the labels seen first, and fills a label short of points from the others.
        score: :func:`hessian_score` of every example (largest first for ``"hessian"``).
        size: points to keep (``1 <= size < N``).
        method: ``"hessian"``, ``"random"`` or ``"kcenter"``.
        generator: seeds ``"random"``.
    """
    m = as_enum(MemorySelection, method, "selection")
    n = x.shape[0]
    check_positive_int(size, "memory_size")
    if size >= n:
        raise ValueError(f"memory_size={size} is too large for a task of {n} examples; it must be smaller.")
    if m is MemorySelection.RANDOM:
        return random_coreset(n, size, generator)
    if m is MemorySelection.KCENTER:
        return kcenter_coreset(x.detach().cpu(), size).sort().values
    score, y = score.detach().cpu(), y.detach().cpu()
    labels = torch.unique(y, sorted=True)
    quota = [size // len(labels) + (i < size % len(labels)) for i in range(len(labels))]
    chosen = []
    for lab, k in zip(labels, quota):
        idx = torch.nonzero(y == lab).flatten()
        chosen.append(idx[score[idx].argsort(descending=True, stable=True)[:k]])
    picked = torch.cat(chosen)
    if picked.numel() < size:  # a label with too few examples: the best of the rest
        rest = torch.ones(n, dtype=torch.bool)
        rest[picked] = False
        idx = torch.nonzero(rest).flatten()
        picked = torch.cat([picked, idx[score[idx].argsort(descending=True, stable=True)[: size - picked.numel()]]])
    return picked.sort().values


def _groups(q: Gaussian, names: Sequence[str]) -> list[tuple[Any, tuple[str, ...]]]:
    """``(how, names)`` pairs that contract Jacobians with ``Σ``: a KronBlock's factor with its ``(w, b)``, or
    ``None`` (elementwise variance) for a single parameter."""
    out: list[tuple[Any, tuple[str, ...]]] = []
    owned: set[str] = set()
    if isinstance(q, KronGaussian):
        for layer, (w, b) in q.layers.items():
            if w in names:
                out.append((q.block(layer).factor(approx=True), (w,) if b is None else (w, b)))
                owned.update(n for n in (w, b) if n is not None)
    out += [(None, (n,)) for n in names if n not in owned]
    return out


def _variance(q: Gaussian, name: str, like: Tensor) -> Tensor:
    if isinstance(q, DiagGaussian):
        return q.variance[name].to(like)
    return (1.0 / q.diag[name].to(like)).expand_as(like)


def _contract(q: Gaussian, how: Any, names: tuple[str, ...], jac: dict[str, Tensor], params: dict[str, Tensor]
              ) -> Tensor:
    """``Z`` with ``Z Zᵀ = J Σ Jᵀ`` for one group (``(M, ·)``)."""
    j = jac[names[0]]
    m = j.shape[0]
    if how is None:  # elementwise
        return (j * _variance(q, names[0], params[names[0]]).sqrt()).reshape(m, -1)
    jb = j.reshape(m, j.shape[1], -1)  # the block W̃ = [W, b] per example
    if len(names) == 2:
        jb = torch.cat([jb, jac[names[1]].reshape(m, -1, 1)], dim=2)
    if how.chol is not None:  # Λ = L Lᵀ: J Λ⁻¹ Jᵀ = (L⁻¹Jᵀ)ᵀ(L⁻¹Jᵀ)
        chol = how.chol.to(jb)
        return torch.linalg.solve_triangular(chol, jb.reshape(m, -1).T, upper=False).T
    return (how.rot(jb.to(how.lam)) / how.lam.sqrt()).reshape(m, -1).to(jb)


def _per_example_grads(f: Any, params: dict[str, Tensor], c: int, inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """``∂f(params, c, *row)/∂params`` for every row, stacked: ``vmap`` of ``grad``, or a loop over the rows when the
    model cannot be vmapped (e.g. Avalanche's ``torch.unique`` over task labels)."""
    g = grad(f)
    try:
        return vmap(g, in_dims=(None, None, *([0] * len(inputs))))(params, c, *inputs)
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
    rows = [g(params, c, *(t[i] for t in inputs)) for i in range(inputs[0].shape[0])]
    return {n: torch.stack([r[n] for r in rows]) for n in params}


def function_kernel(model: nn.Module, posterior: Gaussian, inputs: tuple[Tensor, ...],
                    output: FunctionOutput | str = FunctionOutput.SOFTMAX,
                    num_outputs: int | None = None) -> tuple[Tensor, Tensor]:
    r"""The GP that ``posterior``'s covariance induces on the function at ``inputs``, linearised at the model's
    current weights: ``(m, K)`` with ``m = f(inputs)`` ``(M, C)`` and ``K[c] = J_c Σ J_cᵀ`` ``(C, M, M)``.

    Args:
        model: the network (eval mode is used; its weights are the linearisation point, e.g. the Laplace mean).
        posterior: a :class:`DiagGaussian` or :class:`KronGaussian` over (some of) the model's parameters; only its
            covariance is used, the other parameters are fixed.
        inputs: ``(x,)`` or ``(x, task_id)`` for ``M`` points.
        output: ``"softmax"`` or ``"logits"`` (module docstring).
        num_outputs: outputs kept (default: all the model gives).

    Raises:
        ValueError: a posterior parameter is not a parameter of the model.
    """
    q = check_gaussian(posterior, "posterior")
    out_kind = as_enum(FunctionOutput, output, "output")
    named = dict(model.named_parameters())
    if missing := [n for n in q.names if n not in named]:
        raise ValueError(f"posterior parameter {missing[0]!r} is not a parameter of {type(model).__name__}.")
    params = {n: named[n].detach() for n in q.names}
    fixed = {n: p.detach() for n, p in named.items() if n not in params}
    with torch.no_grad(), eval_mode(model):
        logits = model(*inputs)
    c_out = logits.shape[-1] if num_outputs is None else check_positive_int(num_outputs, "num_outputs")
    mean = function_values(logits, c_out, out_kind).detach()

    def f_c(p: dict[str, Tensor], c: int, *row: Tensor) -> Tensor:
        z = functional_call(model, {**fixed, **p}, tuple(r.unsqueeze(0) for r in row), strict=False)
        return function_values(z, c_out, out_kind)[0, c]

    groups = _groups(q, list(params))
    kernels = []
    with torch.enable_grad(), eval_mode(model):
        for c in range(c_out):
            jac = _per_example_grads(f_c, params, c, inputs)
            kc = torch.zeros(mean.shape[0], mean.shape[0], dtype=mean.dtype, device=mean.device)
            for how, names in groups:
                z = _contract(q, how, names, jac, params)
                kc += z @ z.T
            kernels.append(kc)
    return mean, torch.stack(kernels)


def _jittered_cholesky(k: Tensor, jitter: float | Tensor) -> Tensor:
    """Lower Cholesky factors (float64) of ``K[..., c] + jitter · I`` for ``K`` ``(..., C, s, s)`` (``jitter`` a
    number or one per leading index, ``(T,)``)."""
    k = k.double()
    if isinstance(jitter, Tensor):
        jitter = jitter.to(k).reshape(jitter.shape + (1,) * (k.dim() - jitter.dim()))
    return torch.linalg.cholesky(k + jitter * torch.eye(k.shape[-1], dtype=k.dtype, device=k.device))


@dataclass
class FunctionalSite:
    """One past task's term: its memorable ``inputs``, the function ``mean`` there at the end of the task
    ``(M, C)`` and the kernel ``(C, M, M)`` (module docstring); ``jitter`` is the variance added to its diagonal."""

    inputs: tuple[Tensor, ...]
    mean: Tensor
    kernel: Tensor
    jitter: float = 1e-4
    _chol: Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        m, c = self.mean.shape
        if tuple(self.kernel.shape) != (c, m, m) or any(t.shape[0] != m for t in self.inputs):
            raise ValueError(f"a functional site needs inputs of {m} rows and a kernel of shape ({c}, {m}, {m}); got "
                             f"{[tuple(t.shape) for t in self.inputs]} and {tuple(self.kernel.shape)}.")
        check_real(self.jitter, "jitter", low=0.0, low_open=True)

    @property
    def size(self) -> int:
        """``M``, the number of stored points."""
        return self.mean.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.mean.shape[1]

    def cholesky(self) -> Tensor:
        """Cholesky factors ``(C, M, M)`` of the jittered kernel (float64, cached)."""
        if self._chol is None:
            self._chol = _jittered_cholesky(self.kernel, self.jitter)
        return self._chol

    def quadratic(self, f: Tensor) -> Tensor:
        """``½ Σ_c r_cᵀ (K_c + εI)⁻¹ r_c`` with ``r = f − mean`` at all ``M`` points (differentiable in ``f``)."""
        r = (f - self.mean).double().T.unsqueeze(-1)  # (C, M, 1)
        return (0.5 * (r * torch.cholesky_solve(r, self.cholesky())).sum()).to(f.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FunctionalSite:
        """Moved (floating tensors cast to ``dtype``; the cached factor stays float64)."""
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        chol = None if self._chol is None else self._chol.to(device=device)
        return FunctionalSite(tuple(mv(t) for t in self.inputs), mv(self.mean), mv(self.kernel), self.jitter, chol)

    def state_dict(self) -> dict[str, Any]:
        return {"inputs": list(self.inputs), "mean": self.mean, "kernel": self.kernel, "jitter": self.jitter}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FunctionalSite:
        return cls(tuple(state["inputs"]), state["mean"], state["kernel"], float(state["jitter"]))


def allocate(points_per_step: int | None, sizes: Sequence[int]) -> list[int]:
    """Points drawn from each site in one step: all of them (``None``), else an equal share
    ``points_per_step // len(sizes)`` of the cap, at least one and at most ``sizes[t]`` each."""
    if points_per_step is None:
        return list(sizes)
    share = max(1, check_positive_int(points_per_step, "points_per_step") // max(len(sizes), 1))
    return [min(s, share) for s in sizes]


@dataclass
class SiteStack:
    """Sites of equal size ``M``, outputs ``C`` and input arity stacked for one batched term (prepared once per
    set of sites by :func:`stack_sites`): ``inputs`` ``(T, M, ...)``, ``mean`` ``(T, M, C)``, ``kernel``
    ``(T, C, M, M)``, ``jitter`` ``(T,)``."""

    inputs: tuple[Tensor, ...]
    mean: Tensor
    kernel: Tensor
    jitter: Tensor
    _chol: Tensor | None = field(default=None, repr=False)

    size = property(lambda self: self.mean.shape[1], doc="``M``, the points per site.")

    def cholesky(self, idx: Tensor | None = None) -> Tensor:
        """``(T, C, s, s)`` float64 factors of the jittered kernels (cached), or of their marginals on ``idx``
        ``(T, s)``."""
        if idx is None:
            if self._chol is None:
                self._chol = _jittered_cholesky(self.kernel, self.jitter)
            return self._chol
        t, c, m, _ = self.kernel.shape
        k = idx.shape[1]
        flat = (idx[:, :, None] * m + idx[:, None, :]).reshape(t, 1, k * k).expand(t, c, k * k)
        sub = torch.gather(self.kernel.reshape(t, c, m * m), 2, flat).reshape(t, c, k, k)
        return _jittered_cholesky(sub, self.jitter)


def stack_sites(sites: Sequence[FunctionalSite]) -> list[SiteStack]:
    """Group ``sites`` by ``(M, C, input arity)`` (first appearance first) and stack each group."""
    groups: dict[tuple[int, int, int], list[FunctionalSite]] = {}
    for s in sites:
        groups.setdefault((s.size, s.num_outputs, len(s.inputs)), []).append(s)
    return [SiteStack(tuple(torch.stack([s.inputs[j] for s in g]) for j in range(len(g[0].inputs))),
                      torch.stack([s.mean for s in g]), torch.stack([s.kernel for s in g]),
                      torch.tensor([s.jitter for s in g], dtype=torch.float64, device=g[0].mean.device))
            for g in groups.values()]


def functional_prior(model: nn.Module, sites: Sequence[FunctionalSite] | Sequence[SiteStack],
                     output: FunctionOutput | str = "softmax", points_per_step: int | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    r""":math:`R(\theta)` of the module docstring at the model's current weights (one forward through the drawn points
    of every site, concatenated; the caller chooses the model's mode).

    With ``points_per_step`` each site contributes its scaled marginal on ``allocate(...)`` points drawn uniformly
    without replacement (``generator``; per stack, ``torch.rand((T, M)).argsort(-1)[:, :s]``, sorted). The value
    is exact; its gradient, :math:`\sum \frac{M}{s} J^\top (K_{SS}+\epsilon I)^{-1} r`, flows through the outputs
    only (the solves run without autograd).

    Args:
        model: the network.
        sites: :class:`FunctionalSite` objects, or the :class:`SiteStack` list of :func:`stack_sites` (prepared once).
        output: ``"softmax"`` or ``"logits"``.
        points_per_step: the cap (``None``: every point, with the cached factors).
        generator: draws the points.
    """
    if not sites:
        raise ValueError("functional_prior needs at least one site.")
    stacks = list(sites) if isinstance(sites[0], SiteStack) else stack_sites(sites)  # type: ignore[arg-type]
    if len({len(s.inputs) for s in stacks}) != 1:
        raise ValueError("the sites mix inputs with and without task ids; a model is called one way.")
    share = allocate(points_per_step, [s.size for s in stacks for _ in range(s.mean.shape[0])])
    draws, start = [], 0
    for s in stacks:
        t, m = s.mean.shape[:2]
        k = share[start]
        start += t
        idx = None if k >= m else torch.rand((t, m), generator=generator).argsort(-1)[:, :k].sort(-1).values
        draws.append((k, None if idx is None else idx.to(s.mean.device)))
    rows = [torch.arange(s.mean.shape[0], device=s.mean.device)[:, None] for s in stacks]
    inputs = tuple(torch.cat([(x if idx is None else x[r, idx]).flatten(0, 1)
                              for s, (_, idx), r in zip(stacks, draws, rows) for x in (s.inputs[j],)])
                   for j in range(len(stacks[0].inputs)))
    logits = model(*inputs)
    value, surrogate, start = logits.new_zeros((), dtype=torch.float64), logits.new_zeros(()), 0
    for s, (k, idx), r in zip(stacks, draws, rows):
        t, m, c = s.mean.shape
        f = function_values(logits[start:start + t * k].reshape(t, k, -1), c, output)
        start += t * k
        res = f - (s.mean if idx is None else s.mean[r, idx])
        with torch.no_grad():
            rd = res.detach().double().transpose(1, 2).unsqueeze(-1)  # (T, C, s, 1)
            w = torch.cholesky_solve(rd, s.cholesky(idx))
            value = value + (m / k) * 0.5 * (rd * w).sum()
        surrogate = surrogate + (m / k) * (f * w.squeeze(-1).transpose(1, 2).to(f.dtype)).sum()
    return value.to(logits.dtype) + (surrogate - surrogate.detach())
