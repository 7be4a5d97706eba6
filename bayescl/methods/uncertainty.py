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
     "method": "glm" | "mc" | None,    # how a posterior was sampled (predictive_samples.mc_probs); None: no posterior
     "n_samples": S, "max_examples": M, "n_bins": K,
     "auroc_epistemic": a | None,      # trained (tasks <= i) vs future (tasks > i) inputs; None at the last stage
     "auroc_total": a | None,          # the same with the total entropy as the score
     "tasks": [{"task": j, "count": n,
                "accuracy": a,         # the predictive's (argmax of the mean of the samples)
                "net_accuracy": a,     # the network's own softmax on the same examples
                "total": H, "aleatoric": A, "epistemic": E,   # mean nats per example
                "nll": L, "ece": e,
                "bin_count": [K ints], "bin_confidence": [K sums of confidence], "bin_correct": [K ints]},
               ...]}                   # one entry per task of the stream, in order

Separation of trained and future tasks (Hendrycks & Gimpel 2017's AUROC, with the continual-learning split):
after stage :math:`i`, the examples of tasks :math:`j \le i` are *trained*, those of tasks :math:`j > i`
*future*, and with an uncertainty score :math:`s` (epistemic or total, per example)

.. math::

    \mathrm{AUROC} = P(s_{\text{future}} > s_{\text{trained}}) + \tfrac12 P(s_{\text{future}} = s_{\text{trained}})
    = \frac{U}{n_{\text{future}}\, n_{\text{trained}}},

the Mann-Whitney statistic from average ranks (:func:`binary_auroc`, equal to torchmetrics' ``binary_auroc``
with the future inputs as positives; read with the trained inputs as positives it is the AUROC of :math:`-s`).
1: every future input is more uncertain than every trained one; 0.5: no separation (a point estimate's
epistemic part is 0 everywhere, so 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchmetrics import Metric

from bayescl._batches import move_inputs, split_batch
from bayescl._checks import check_positive_int
from bayescl._params import eval_mode
from bayescl.methods.predictive_samples import mc_probs, posterior_for, resolve_method, sampler
from bayescl.methods.variational import is_stochastic

__all__ = ["N_BINS", "PredictiveUncertainty", "TaskUncertainty", "binary_auroc", "decompose", "ece_from_bins",
           "entropy", "evaluate_uncertainty", "mc_probs", "posterior_for", "stage_auroc", "stage_records_to_arrays"]

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


# --------------------------------------------------------------------------------------------------- separation
def binary_auroc(scores: Tensor, positive: Tensor) -> float:
    """AUROC of ``scores`` for telling ``positive`` examples (bool, same shape) from the others: the
    Mann-Whitney :math:`U/(n_+ n_-)` with average ranks for ties (module docstring); NaN when a class is empty.

    >>> binary_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, True, False, True]))
    1.0
    """
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    pos = torch.as_tensor(positive).reshape(-1).bool()
    if s.shape != pos.shape:
        raise ValueError(f"scores {tuple(s.shape)} and positive {tuple(pos.shape)} must have the same shape.")
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    ranks = (last - (counts.double() - 1) / 2)[inverse]  # 1-based average rank of every example
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def stage_auroc(scores: Sequence[Tensor], stage: int) -> float | None:
    """AUROC of per-example ``scores[j]`` (one tensor per task, in stream order) for future tasks (``j > stage``)
    against trained ones (``j <= stage``); ``None`` when either side has no example (e.g. the last stage)."""
    stage = check_positive_int(stage, "stage", allow_zero=True)
    trained = [t.reshape(-1) for t in scores[: stage + 1]]
    future = [t.reshape(-1) for t in scores[stage + 1:]]
    if not trained or not future or sum(t.numel() for t in trained) == 0 or sum(t.numel() for t in future) == 0:
        return None
    s = torch.cat([*trained, *future]).double()
    positive = torch.zeros(s.numel(), dtype=torch.bool)
    positive[sum(t.numel() for t in trained):] = True
    return binary_auroc(s, positive)


# --------------------------------------------------------------------------------------------------- stage record
def evaluate_uncertainty(module: nn.Module, posterior: Any | None, test_loaders: Sequence[Any], stage: int,
                         n_samples: int = 16, max_examples: int = 500, generator: torch.Generator | None = None,
                         n_bins: int = N_BINS, seed: int = 0, method: str | None = None) -> dict[str, Any]:
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
        method: ``"glm"``, ``"mc"`` or ``None`` (the default of :func:`mc_probs`): the same predictive as
            :func:`mc_probs` (:func:`bayescl.methods.predictive_samples.sampler`, fixed for the whole stage).

    Torch's global random state is left as it was, so adding this evaluation does not change the training runs.
    """
    stage = check_positive_int(stage, "stage", allow_zero=True)
    check_positive_int(max_examples, "max_examples")
    check_positive_int(n_samples, "n_samples")
    method = resolve_method(module, posterior, method)
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    if posterior is not None:
        source = "posterior"
    elif is_stochastic(module):
        source = "model"
    else:
        source = "point"
    devices = [device.index or 0] if device.type == "cuda" else []
    scores: dict[str, list[Tensor]] = {"epistemic": [], "total": []}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(10_007 * seed + stage)
        tasks = []
        with torch.no_grad(), eval_mode(module):
            draw = sampler(module, posterior, n_samples, generator, method)  # one predictive for every task
            metrics, net_correct = [], []
            for j, loader in enumerate(test_loaders):
                metric = PredictiveUncertainty(n_bins=n_bins)
                correct, per_task = 0, {k: [] for k in scores}
                for batch in _capped(loader, max_examples, seed=seed + j):
                    inputs, y = split_batch(batch)
                    inputs, y = move_inputs(inputs, y, device)
                    probs = draw(inputs)
                    metric.update(probs, y)
                    for k, v in decompose(probs).items():
                        if k in per_task:
                            per_task[k].append(v.double().cpu())
                    correct += int((module(*inputs).argmax(-1) == y).sum())
                metrics.append(metric)
                net_correct.append(correct)
                for k, kept in scores.items():
                    kept.append(torch.cat(per_task[k]) if per_task[k] else torch.zeros(0, dtype=torch.float64))
        for j, metric in enumerate(metrics):
            out, rel = metric.compute(), metric.reliability()
            rec: dict[str, Any] = {"task": j, "count": int(out["count"])}
            rec.update({k: float(out[k]) for k in ("accuracy", *_STATS, "ece")})
            rec["net_accuracy"] = net_correct[j] / rec["count"] if rec["count"] else math.nan
            rec.update({k: v.tolist() for k, v in rel.items()})
            tasks.append(rec)
    return {"stage": stage, "source": source, "method": method,
            "n_samples": n_samples if source != "point" else 1, "max_examples": max_examples, "n_bins": n_bins,
            **{f"auroc_{k}": stage_auroc(v, stage) for k, v in scores.items()}, "tasks": tasks}


def stage_records_to_arrays(records: Sequence[dict[str, Any]], num_tasks: int) -> dict[str, Tensor]:
    """Stack stage records (one seed) into ``(T, T)`` tensors per statistic (NaN where missing), ``(T, T, K)``
    per-bin sums (zeros where missing) and ``(T,)`` per-stage ``auroc_epistemic`` / ``auroc_total`` (NaN where
    missing: the last stage, older records)."""
    T = check_positive_int(num_tasks, "num_tasks")
    K = int(records[0]["n_bins"]) if records else N_BINS
    out = {k: torch.full((T, T), float("nan"), dtype=torch.float64)
           for k in ("accuracy", "net_accuracy", *_STATS, "ece", "count")}
    for k in ("auroc_epistemic", "auroc_total"):
        out[k] = torch.full((T,), float("nan"), dtype=torch.float64)
    for k in _BINS:
        out[k] = torch.zeros(T, T, K, dtype=torch.float64)
    for rec in records:
        i = int(rec["stage"])
        for k in ("auroc_epistemic", "auroc_total"):
            if 0 <= i < T and rec.get(k) is not None:
                out[k][i] = float(rec[k])
        for t in rec["tasks"]:
            j = int(t["task"])
            if not (0 <= i < T and 0 <= j < T):
                raise ValueError(f"uncertainty record (stage {i}, task {j}) is outside a {T}-task stream.")
            for k in ("accuracy", "net_accuracy", *_STATS, "ece", "count"):
                out[k][i, j] = float(t[k]) if t.get(k) is not None else math.nan
            for k in _BINS:
                v = torch.tensor(t[k], dtype=torch.float64)
                if v.shape != (K,):
                    raise ValueError(f"uncertainty record (stage {i}, task {j}) has {k} of length {v.numel()}; "
                                     f"expected n_bins={K}.")
                out[k][i, j] = v
    return out

