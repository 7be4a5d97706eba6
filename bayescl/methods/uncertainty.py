r"""Predictive uncertainty users can see: entropy decomposition, calibration and log-loss, per task.

For a posterior predictive given as :math:`S` Monte Carlo probability vectors :math:`p_s = \mathrm{softmax}(f(x;
\theta_s))`, :math:`\theta_s \sim q`, with mean :math:`\bar p = \frac1S\sum_s p_s` (Depeweg et al. 2018;
Gal 2016, §3.3):

.. math::

    \underbrace{\mathbb H[\bar p]}_{\text{total}} =
    \underbrace{\tfrac1S \textstyle\sum_s \mathbb H[p_s]}_{\text{aleatoric (expected entropy)}} +
    \underbrace{\mathbb H[\bar p] - \tfrac1S \textstyle\sum_s \mathbb H[p_s]}_{\text{epistemic (mutual information)}},

in nats. The epistemic part is the mutual information between the label and the weights; it is :math:`\ge 0` by
Jensen (entropy is concave), so only rounding can make it negative and such values are set to 0. A single
predictive ``(B, C)`` counts as one sample: its epistemic part is 0.

Calibration uses the predictive mean: confidence :math:`\max_c \bar p_c`, prediction :math:`\arg\max_c \bar p_c`,
``n_bins`` equal-width bins :math:`[b_k, b_{k+1})` (the last one closed) and
:math:`\mathrm{ECE} = \sum_k \frac{n_k}{N}\,|\mathrm{acc}_k - \mathrm{conf}_k|` (Guo et al. 2017). It is the value
of torchmetrics' ``multiclass_calibration_error(norm="l1")`` (asserted in the tests), computed from per-bin sums
so that the state is bounded, reducible across processes and gives the reliability diagram too (torchmetrics keeps
every confidence; it also puts a confidence of exactly 1 into a bin of its own, here it is in the last bin).
The negative log-likelihood is :math:`-\log \bar p_y` (the predictive log-loss).

Result schema of :func:`evaluate_uncertainty` (one *stage record*; the harness keeps a list of them per seed under
``"uncertainty"``, which :mod:`bayescl.harness.report` turns into tables and plots)::

    {"stage": i,                       # index of the last task trained on
     "source": "posterior" | "model" | "point",
     "n_samples": S, "max_examples": M, "n_bins": K,
     "tasks": [{"task": j, "count": n, "accuracy": a,
                "total": H, "aleatoric": A, "epistemic": E,   # mean nats per example
                "nll": L, "ece": e,
                "bin_count": [K ints], "bin_confidence": [K sums of confidence], "bin_correct": [K ints]},
               ...]}                   # one entry per task of the stream, in order
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset
from torchmetrics import Metric

from bayescl._batches import move_inputs, split_batch
from bayescl._checks import check_positive_int
from bayescl._params import eval_mode
from bayescl.methods.predictive import check_posterior_names, glm_logit_moments, glm_samples, glm_supported
from bayescl.methods.variational import is_stochastic, predictive_samples

#: Default number of equal-width confidence bins (torchmetrics' default).
N_BINS = 15
_STATS = ("total", "aleatoric", "epistemic", "nll")


# --------------------------------------------------------------------------------------------------- maths
def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy :math:`-\\sum_c p_c \\log p_c` in nats along ``dim`` (``0 \\log 0 = 0``)."""
    return -torch.special.xlogy(p, p).sum(dim)


def _as_samples(probs: Tensor) -> Tensor:
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        raise TypeError(f"probs must be a floating-point Tensor, got {getattr(probs, 'dtype', type(probs))}.")
    if probs.dim() == 2:
        probs = probs.unsqueeze(0)
    if probs.dim() != 3 or probs.shape[0] == 0 or probs.shape[-1] == 0:
        raise ValueError(f"probs must have shape (S, B, C) or (B, C); got {tuple(probs.shape)}.")
    tol = 1e-3 if probs.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-6
    if bool((probs < -tol).any()) or bool(((probs.sum(-1) - 1).abs() > tol).any()):
        raise ValueError("probs must be probabilities (non-negative, summing to 1 over the last dimension); "
                         "apply softmax to logits first.")
    return probs


def decompose(probs: Tensor) -> dict[str, Tensor]:
    """Per-example ``{"total", "aleatoric", "epistemic"}`` (nats, shape ``(B,)``) of samples ``(S, B, C)``.

    >>> p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])      # two confident samples that disagree
    >>> {k: round(float(v), 4) for k, v in decompose(p).items()}
    {'total': 0.6931, 'aleatoric': 0.0, 'epistemic': 0.6931}
    """
    probs = _as_samples(probs)
    total = entropy(probs.mean(0))
    aleatoric = entropy(probs).mean(0)
    return {"total": total, "aleatoric": aleatoric, "epistemic": (total - aleatoric).clamp_min(0.0)}


def _batch_sums(probs: Tensor, target: Tensor, n_bins: int) -> dict[str, Tensor]:
    """Sums over a batch of everything the metrics keep (float64 / long)."""
    probs = _as_samples(probs)
    if target.dim() != 1 or target.shape[0] != probs.shape[1]:
        raise ValueError(f"target must have shape ({probs.shape[1]},) to match probs {tuple(probs.shape)}; "
                         f"got {tuple(target.shape)}.")
    if target.numel() and not (0 <= int(target.min()) and int(target.max()) < probs.shape[-1]):
        raise ValueError(f"target labels must lie in 0..{probs.shape[-1] - 1}; got {int(target.min())}.."
                         f"{int(target.max())}.")
    probs = probs.double()
    target = target.to(probs.device).long()
    parts = decompose(probs)
    mean = probs.mean(0)
    conf, pred = mean.max(-1)
    correct = pred == target
    p_y = mean.gather(-1, target[:, None]).squeeze(-1)
    nll = -torch.log(p_y.clamp_min(torch.finfo(torch.float64).tiny))
    idx = (torch.bucketize(conf, torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device),
                           right=True) - 1).clamp(0, n_bins - 1)
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    return {
        **{k: v.sum() for k, v in parts.items()},
        "nll": nll.sum(),
        "correct": correct.sum(),
        "count": torch.tensor(target.numel(), device=conf.device),
        "bin_count": torch.zeros(n_bins, dtype=torch.long, device=conf.device).index_add_(
            0, idx, torch.ones_like(idx)),
        "bin_confidence": zeros.clone().index_add_(0, idx, conf),
        "bin_correct": torch.zeros(n_bins, dtype=torch.long, device=conf.device).index_add_(0, idx, correct.long()),
    }


def ece_from_bins(count: Tensor, confidence: Tensor, correct: Tensor) -> Tensor:
    """:math:`\\sum_k \\frac{n_k}{N}|\\mathrm{acc}_k-\\mathrm{conf}_k| = \\frac1N\\sum_k |\\mathrm{correct}_k -
    \\mathrm{confidence}_k|` over the last dimension (per-bin sums); NaN where ``N = 0``."""
    n = count.sum(-1).double()
    gap = (correct.double() - confidence.double()).abs().sum(-1)
    return torch.where(n > 0, gap / n.clamp_min(1), torch.full_like(n, float("nan")))


# --------------------------------------------------------------------------------------------------- metrics
_BINS = ("bin_count", "bin_confidence", "bin_correct")


class _SummedUncertainty(Metric):
    """States of shape ``shape`` (sums of :func:`_batch_sums`, per-bin ones ``shape + (n_bins,)``), reduced with
    ``sum``; ``compute`` gives per-example means (NaN where nothing was counted), ECE and counts."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, shape: tuple[int, ...], n_bins: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        K = self.n_bins = check_positive_int(n_bins, "n_bins")
        for k in _STATS:
            self.add_state(k, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        for k, dtype in (("correct", torch.long), ("count", torch.long)):
            self.add_state(k, torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")
        for k, dtype in zip(_BINS, (torch.long, torch.float64, torch.long)):
            self.add_state(k, torch.zeros((*shape, K), dtype=dtype), dist_reduce_fx="sum")

    def compute(self) -> dict[str, Tensor]:
        n = self.count.double()
        nan = torch.full_like(n, float("nan"))
        out = {k: torch.where(n > 0, getattr(self, k) / n.clamp_min(1), nan) for k in _STATS}
        out["accuracy"] = torch.where(n > 0, self.correct.double() / n.clamp_min(1), nan)
        out["ece"] = ece_from_bins(self.bin_count, self.bin_confidence, self.bin_correct)
        out["count"] = self.count.clone()
        return out

    def reliability(self) -> dict[str, Tensor]:
        """Per-bin sums ``{"bin_count", "bin_confidence", "bin_correct"}`` (shape ``(..., n_bins)``)."""
        return {k: getattr(self, k).clone() for k in _BINS}


class PredictiveUncertainty(_SummedUncertainty):
    """Mean total / aleatoric / epistemic entropy, NLL, accuracy and ECE of a posterior predictive.

    ``update(probs, target)`` takes probability samples ``(S, B, C)`` (or one predictive ``(B, C)``) and labels
    ``(B,)``; ``compute()`` returns ``{"total", "aleatoric", "epistemic", "nll", "ece", "accuracy", "count"}``
    (0-dim tensors; means per example, nats); :meth:`reliability` the per-bin sums ``(n_bins,)``. States are sums,
    reduced across processes with ``sum``.

    Args:
        n_bins: equal-width confidence bins for the ECE and :meth:`reliability`.
    """

    def __init__(self, n_bins: int = N_BINS, **kwargs: Any) -> None:
        super().__init__((), n_bins, **kwargs)

    def update(self, probs: Tensor, target: Tensor) -> None:  # type: ignore[override]
        for k, v in _batch_sums(probs, target, self.n_bins).items():
            getattr(self, k).add_(v.to(getattr(self, k)))


class TaskUncertainty(_SummedUncertainty):
    """:class:`PredictiveUncertainty` per (training stage, evaluated task), like
    :class:`~bayescl.harness.metrics.AccuracyMatrix`: compare old and new tasks as the stream goes on::

        metric = TaskUncertainty(num_tasks=5)
        metric.update(probs, y, stage=i, task=j)   # probs (S, B, C): after training task i, on task j's data
        out = metric.compute()                     # {"epistemic": (5, 5), ..., "ece": (5, 5)}, NaN: never seen

    ``compute()`` gives ``(T, T)`` tensors (NaN if never evaluated), :meth:`reliability` ``(T, T, n_bins)``.

    Args:
        num_tasks: tasks in the stream.
        n_bins: confidence bins for the per-task ECE and :meth:`reliability`.
    """

    def __init__(self, num_tasks: int, n_bins: int = N_BINS, **kwargs: Any) -> None:
        T = check_positive_int(num_tasks, "num_tasks")
        super().__init__((T, T), n_bins, **kwargs)
        self.num_tasks = T

    def update(self, probs: Tensor, target: Tensor, stage: int, task: int) -> None:  # type: ignore[override]
        for name, v in (("stage", stage), ("task", task)):
            if not 0 <= int(v) < self.num_tasks:
                raise ValueError(f"{name}={v} is out of range; allowed: 0..{self.num_tasks - 1}.")
        for k, v in _batch_sums(probs, target, self.n_bins).items():
            getattr(self, k)[stage, task] += v.to(getattr(self, k))


# --------------------------------------------------------------------------------------------------- sampling
def _draw_weights(model: nn.Module, posterior: Any, n_samples: int,
                  generator: torch.Generator | None) -> list[dict[str, Tensor]]:
    """``n_samples`` draws of ``posterior.sample`` cast to the model's parameters (one call per draw, as in
    :func:`bayescl.methods.predictive.predictive`, so the same generator gives the same weights)."""
    named = check_posterior_names(model, posterior)
    return [{n: t.to(named[n]) for n, t in posterior.sample(generator=generator).items()} for _ in range(n_samples)]


def _probs(model: nn.Module, weights: list[dict[str, Tensor]] | None, inputs: tuple[Tensor, ...],
           n_samples: int) -> Tensor:
    if weights is not None:
        return torch.stack([torch.softmax(functional_call(model, w, inputs, strict=False), dim=-1) for w in weights])
    if not is_stochastic(model):
        return torch.softmax(model(*inputs), dim=-1).unsqueeze(0)
    with predictive_samples(model, 1):
        return torch.stack([torch.softmax(model(*inputs), dim=-1) for _ in range(n_samples)])


@torch.no_grad()
def mc_probs(model: nn.Module, posterior: Any | None, inputs: tuple[Tensor, ...], n_samples: int = 16,
             generator: torch.Generator | None = None, method: str | None = None) -> Tensor:
    """Monte Carlo samples ``(S, B, C)`` of the softmax of ``model(*inputs)`` under the weight posterior.

    * ``method="glm"`` (the default for a :class:`~bayescl.gaussian.diag.DiagGaussian`, and for a
      :class:`~bayescl.gaussian.kron.KronGaussian` whose layers are all ``nn.Linear``): samples of the linearised
      predictive, logits drawn from ``N(f(x; μ), diag v)`` (:func:`bayescl.methods.predictive.glm_logit_moments`) — a
      Laplace posterior sampled through the whole network underfits (Immer et al. 2021).
    * ``method="mc"`` (the default for other Kronecker posteriors, e.g. with Conv2d), ``posterior`` over (some of)
      ``model``'s parameters (e.g. ``LaplaceCallback.posterior()`` with the LightningModule as ``model``): ``S =
      n_samples`` draws ``θ_s = posterior.sample(generator)``, each run with ``torch.func.functional_call`` (the
      same sampling as :func:`bayescl.methods.predictive.predictive`: with the same generator state, the mean of these
      samples is its ``"mc"`` predictive).
    * ``posterior=None`` and a model whose variational layers sample themselves (after ``VCLCallback``): ``S``
      eval-mode calls, one weight sample each (``generator`` is not used; the layers draw from their own or torch's
      RNG).
    * ``posterior=None`` and a deterministic model: its softmax, ``S = 1`` (a point estimate).

    The model is put in ``eval()`` mode for the calls and restored afterwards.
    """
    check_positive_int(n_samples, "n_samples")
    if not isinstance(inputs, tuple):
        raise TypeError(f"inputs must be a tuple of the model's positional inputs, got {type(inputs).__name__}.")
    if method is None:
        method = "glm" if glm_supported(model, posterior) else "mc"
    if method not in ("glm", "mc"):
        raise ValueError(f"method={method!r} is not valid; allowed: 'glm', 'mc' (or None for the default).")
    with eval_mode(model):
        if method == "glm" and posterior is not None:
            logits, v = glm_logit_moments(model, posterior, inputs)
            return glm_samples(logits, v, n_samples, generator)
        weights = None if posterior is None else _draw_weights(model, posterior, n_samples, generator)
        return _probs(model, weights, inputs, n_samples)


def posterior_for(callbacks: Iterable[Any], module: nn.Module) -> Any | None:
    """The weight posterior :func:`mc_probs` should sample for ``module``: that of the first callback with a
    ``predictive_posterior()`` (Laplace: the base prior precision fitted for prediction) or ``posterior()`` over
    parameters of ``module``; ``None`` otherwise (no posterior yet, a point estimate, or VCL, whose layers
    sample themselves)."""
    named = {n for n, _ in module.named_parameters()}
    for cb in callbacks:
        get = getattr(cb, "predictive_posterior", None) or getattr(cb, "posterior", None)
        if not callable(get):
            continue
        try:
            q = get()
        except (RuntimeError, ValueError):
            continue
        if q is not None and all(n in named for n in q.names):
            return q
    return None


def _capped(loader: Any, max_examples: int, seed: int = 0) -> Iterable[Any]:
    """The same fixed random subset of at most ``max_examples`` examples at every call (seeded, not shuffled per
    call), so every stage and every method is scored on the same examples."""
    ds = getattr(loader, "dataset", None)
    try:
        n = len(ds) if ds is not None else None
    except TypeError:
        n = None
    if n is None:  # an arbitrary iterable of batches: its first max_examples examples
        def first() -> Iterable[Any]:
            seen = 0
            for batch in loader:
                if seen >= max_examples:
                    return
                inputs, y = split_batch(batch)
                k = min(len(y), max_examples - seen)
                seen += k
                yield (inputs[0][:k], y[:k], *(t[:k] for t in inputs[1:]))

        return first()
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_examples].sort().values
    bs = getattr(loader, "batch_size", None) or 256
    return DataLoader(Subset(ds, idx.tolist()), batch_size=min(bs, max_examples),
                      collate_fn=getattr(loader, "collate_fn", None))


def evaluate_uncertainty(module: nn.Module, posterior: Any | None, test_loaders: Sequence[Any], stage: int,
                         n_samples: int = 16, max_examples: int = 500, generator: torch.Generator | None = None,
                         n_bins: int = N_BINS, seed: int = 0) -> dict[str, Any]:
    """Uncertainty of ``module`` on every task's test data after training stage ``stage``: one *stage record*
    (schema in the module docstring), JSON-ready.

    Args:
        module: the network (the LightningModule itself: parameter names then match the callbacks' posteriors).
        posterior: see :func:`mc_probs` (``posterior_for(callbacks, module)`` picks it).
        test_loaders: one dataloader per task, in stream order (batches ``(x, y)`` or ``(x, y, task_id)``).
        stage: index of the last task trained on.
        n_samples: Monte Carlo samples ``S``.
        max_examples: test examples per task (a fixed random subset, the same at every stage).
        generator: random generator for the posterior samples (default: torch's, seeded from ``seed`` and ``stage``).
        n_bins: confidence bins.
        seed: seed of the example subset and of the default sampling.

    Torch's global random state is left as it was, so adding this evaluation does not change the training runs.
    """
    stage = check_positive_int(stage, "stage", allow_zero=True)
    check_positive_int(max_examples, "max_examples")
    check_positive_int(n_samples, "n_samples")
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    if posterior is not None:
        source = "posterior"
    elif is_stochastic(module):
        source = "model"
    else:
        source = "point"
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(10_007 * seed + stage)
        tasks = []
        with torch.no_grad(), eval_mode(module):
            # one set of weight samples per stage, shared by every task and batch (a fixed MC predictive)
            weights = None if posterior is None else _draw_weights(module, posterior, n_samples, generator)
            metrics = []
            for j, loader in enumerate(test_loaders):
                metric = PredictiveUncertainty(n_bins=n_bins)
                for batch in _capped(loader, max_examples, seed=seed + j):
                    inputs, y = split_batch(batch)
                    inputs, y = move_inputs(inputs, y, device)
                    metric.update(_probs(module, weights, inputs, n_samples), y)
                metrics.append(metric)
        for j, metric in enumerate(metrics):
            out, rel = metric.compute(), metric.reliability()
            rec: dict[str, Any] = {"task": j, "count": int(out["count"])}
            rec.update({k: float(out[k]) for k in ("accuracy", *_STATS, "ece")})
            rec.update({k: v.tolist() for k, v in rel.items()})
            tasks.append(rec)
    return {"stage": stage, "source": source, "n_samples": n_samples if source != "point" else 1,
            "max_examples": max_examples, "n_bins": n_bins, "tasks": tasks}


def stage_records_to_arrays(records: Sequence[dict[str, Any]], num_tasks: int) -> dict[str, Tensor]:
    """Stack stage records (one seed) into ``(T, T)`` tensors per statistic (NaN where missing) and
    ``(T, T, K)`` per-bin sums (zeros where missing)."""
    T = check_positive_int(num_tasks, "num_tasks")
    K = int(records[0]["n_bins"]) if records else N_BINS
    out = {k: torch.full((T, T), float("nan"), dtype=torch.float64)
           for k in ("accuracy", *_STATS, "ece", "count")}
    for k in _BINS:
        out[k] = torch.zeros(T, T, K, dtype=torch.float64)
    for rec in records:
        i = int(rec["stage"])
        for t in rec["tasks"]:
            j = int(t["task"])
            if not (0 <= i < T and 0 <= j < T):
                raise ValueError(f"uncertainty record (stage {i}, task {j}) is outside a {T}-task stream.")
            for k in ("accuracy", *_STATS, "ece", "count"):
                out[k][i, j] = float(t[k]) if t.get(k) is not None else math.nan
            for k in _BINS:
                v = torch.tensor(t[k], dtype=torch.float64)
                if v.shape != (K,):
                    raise ValueError(f"uncertainty record (stage {i}, task {j}) has {k} of length {v.numel()}; "
                                     f"expected n_bins={K}.")
                out[k][i, j] = v
    return out

