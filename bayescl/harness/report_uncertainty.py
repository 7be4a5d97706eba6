"""The uncertainty part of the report: per-stage records of
:func:`bayescl.methods.uncertainty.evaluate_uncertainty` stacked over seeds, a table after the last task, a table
per stage (the network's and the predictive's accuracy, ECE, the AUROC of epistemic uncertainty for trained vs future
tasks), reliability diagrams and the epistemic uncertainty on old / current / unseen tasks over the stream.

One computation per number: the ECE of a stage is that of the confidence bins pooled over the seeds and the tasks
seen so far (:func:`seen_ece`), in the tables and in the reliability diagrams' titles alike (before, the tables
averaged per-task ECEs while the plots pooled the bins: 1.83 vs 1.06). Numbers over seeds are ``mean ± std``; with
one seed the value alone (:func:`fmt`). A predictive more than :data:`WARN_POINTS` points less accurate than the
network on the same examples is flagged (:func:`accuracy_warnings`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

_UNC_STATS = ("accuracy", "total", "aleatoric", "epistemic", "nll", "ece", "count")
_BINS = ("bin_count", "bin_confidence", "bin_correct")
#: the predictive's accuracy this many points below the network's is flagged
WARN_POINTS = 5.0


def fmt(values: np.ndarray | list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of per-seed ``values`` (NaNs left out) times ``scale``; one value: the value alone; none: —."""
    v = np.asarray(values, dtype=float).reshape(-1) * scale
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "—"
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def uncertainty_arrays(run: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The ``"uncertainty"`` stage records of every seed of ``run`` stacked into arrays: ``(seeds, T, T)`` per
    statistic (NaN where not evaluated) and ``(seeds, T, T, K)`` per-bin sums; ``None`` when no seed has them.

    Raises ``ValueError`` on a malformed section (callers that must not fail catch it)."""
    from bayescl.methods.uncertainty import stage_records_to_arrays

    per_seed = [s.get("uncertainty") for s in run.get("per_seed", []) if isinstance(s, dict)]
    per_seed = [u for u in per_seed if u]
    if not per_seed:
        return None
    T = len(run["accuracy_matrix"][0])
    try:
        stacked = [stage_records_to_arrays(u, T) for u in per_seed]
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"uncertainty section of {run['strategy']!r} is malformed ({exc!r}).") from exc
    K = {a["bin_count"].shape[-1] for a in stacked}
    if len(K) != 1:
        raise ValueError(f"uncertainty section of {run['strategy']!r} mixes n_bins {sorted(K)} across seeds.")
    out = {k: np.stack([a[k].numpy() for a in stacked]) for k in stacked[0]}
    sources = {rec.get("source", "?") for u in per_seed for rec in u}
    out["source"] = np.array(sorted(sources))
    out["method"] = np.array(sorted({str(rec.get("method")) for u in per_seed for rec in u}))
    return out


def _with_uncertainty(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    out = []
    for r in runs:
        try:
            u = uncertainty_arrays(r)
        except ValueError as exc:
            warnings.warn(f"skipping uncertainty of {r['strategy']!r}: {exc}", stacklevel=2)
            continue
        if u is not None:
            out.append((r, u))
    return out


def _last_stage(u: dict[str, np.ndarray]) -> int:
    evaluated = np.nan_to_num(u["count"]).sum(axis=(0, 2)) > 0
    return int(np.nonzero(evaluated)[0].max())


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=float)
    return float(np.nanmean(a)) if np.isfinite(a).any() else math.nan


def _pooled_bins(u: dict[str, np.ndarray], stage: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin sums at ``stage`` pooled over seeds and the tasks seen so far (``0..stage``)."""
    return tuple(u[k][:, stage, : stage + 1].sum(axis=(0, 1)) for k in _BINS)  # type: ignore[return-value]


def _ece(count: np.ndarray, conf: np.ndarray, correct: np.ndarray) -> float:
    n = count.sum()
    return float(np.abs(correct - conf).sum() / n) if n > 0 else math.nan


def seen_ece(u: dict[str, np.ndarray], stage: int) -> float:
    """The ECE after ``stage`` over every example of the seen tasks and all seeds (bins pooled): the one ECE of
    the tables and of the reliability diagrams."""
    return _ece(*_pooled_bins(u, stage))


def seen_accuracy(u: dict[str, np.ndarray], stage: int, key: str = "accuracy") -> np.ndarray:
    """Per seed, the accuracy over the examples of the tasks seen after ``stage`` (``key``: ``"accuracy"`` for
    the predictive, ``"net_accuracy"`` for the network; NaN where the records lack it)."""
    count = np.nan_to_num(u["count"][:, stage, : stage + 1])
    acc = u.get(key, np.full_like(u["count"], np.nan))[:, stage, : stage + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (acc * count).sum(axis=1) / count.sum(axis=1)


def accuracy_warnings(runs: list[dict[str, Any]], points: float = WARN_POINTS) -> list[str]:
    """One sentence per (strategy, stage) where the predictive's accuracy on the seen tasks is more than
    ``points`` below the network's on the same examples (means over seeds)."""
    out = []
    for r, u in _with_uncertainty(runs):
        for i in range(_last_stage(u) + 1):
            net, pred = (float(np.nanmean(a)) if np.isfinite(a).any() else math.nan
                         for a in (seen_accuracy(u, i, "net_accuracy"), seen_accuracy(u, i)))
            if net - pred > points / 100:
                out.append(f"{r['strategy']}: after task {i + 1} the predictive is {100 * pred:.2f} % accurate, "
                           f"the network {100 * net:.2f} % ({100 * (net - pred):.1f} points lower).")
    return out


def epistemic_split(u: dict[str, np.ndarray], stat: str = "epistemic") -> dict[str, np.ndarray]:
    """Mean of ``stat`` over seeds after each stage ``i`` on old tasks (``j < i``), the current one (``j = i``) and
    unseen ones (``j > i``): three arrays of length ``T`` (NaN where there is none)."""
    A = np.nanmean(u[stat], axis=0) if np.isfinite(u[stat]).any() else u[stat][0]
    T = A.shape[0]
    old, cur, new = (np.full(T, np.nan) for _ in range(3))
    for i in range(T):
        if i > 0:
            old[i] = _nanmean(A[i, :i])
        cur[i] = A[i, i]
        if i < T - 1:
            new[i] = _nanmean(A[i, i + 1:])
    return {"old": old, "current": cur, "unseen": new}


def uncertainty_table(runs: list[dict[str, Any]]) -> str:
    """After the last task: the network's and the predictive's accuracy on the seen tasks, NLL, ECE, the entropy
    decomposition (means over seeds and tasks) and the epistemic part on old tasks vs the last one; empty string
    when no run has uncertainty."""
    rows = _with_uncertainty(runs)
    if not rows:
        return ""
    lines = [
        ("| strategy | predictive | network acc (%) | predictive acc (%) | NLL (nats) | ECE (%) | total H "
         "| aleatoric | epistemic | epistemic old tasks | epistemic last task | seeds |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, u in rows:
        s = _last_stage(u)
        seen = {k: u[k][:, s, : s + 1] for k in ("nll", "total", "aleatoric", "epistemic")}
        per_seed = {k: np.array([_nanmean(x) for x in v]) for k, v in seen.items()}
        split = epistemic_split(u)
        lines.append(
            f"| {r['strategy']} | {_source(u)} | {fmt(seen_accuracy(u, s, 'net_accuracy'), 100)} "
            f"| {fmt(seen_accuracy(u, s), 100)} | {fmt(per_seed['nll'], digits=3)} | {100 * seen_ece(u, s):.2f} "
            f"| {fmt(per_seed['total'], digits=3)} | {fmt(per_seed['aleatoric'], digits=3)} "
            f"| {fmt(per_seed['epistemic'], digits=4)} | {split['old'][s]:.4f} | {split['current'][s]:.4f} "
            f"| {u['count'].shape[0]} |"
        )
    return "\n".join(lines)


def _source(u: dict[str, np.ndarray]) -> str:
    src = "/".join(str(x) for x in u["source"])
    methods = [str(x) for x in u.get("method", np.array([])) if str(x) not in ("", "None")]
    return f"{src} ({'/'.join(methods)})" if methods else src


def stage_table(runs: list[dict[str, Any]]) -> str:
    """Per strategy and stage: the network's and the predictive's accuracy on the seen tasks, the ECE (pooled,
    :func:`seen_ece`) and the AUROC of the epistemic and total uncertainty for trained (``j <= i``) vs future
    (``j > i``) tasks (none after the last task); empty string when no run has uncertainty."""
    rows = _with_uncertainty(runs)
    if not rows:
        return ""
    lines = [("| strategy | after task | network acc (%) | predictive acc (%) | ECE (%) | AUROC epistemic "
              "| AUROC total |"), "|---|---|---|---|---|---|---|"]
    for r, u in rows:
        nan = np.full(u["count"].shape[:2], np.nan)
        for i in range(_last_stage(u) + 1):
            lines.append(
                f"| {r['strategy']} | {i + 1} | {fmt(seen_accuracy(u, i, 'net_accuracy'), 100)} "
                f"| {fmt(seen_accuracy(u, i), 100)} | {100 * seen_ece(u, i):.2f} "
                f"| {fmt(u.get('auroc_epistemic', nan)[:, i], digits=3)} "
                f"| {fmt(u.get('auroc_total', nan)[:, i], digits=3)} |")
    return "\n".join(lines)


def plot_uncertainty(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``reliability.png`` (after the last task, pooled over seeds and seen tasks, one panel per strategy) and
    ``epistemic_over_time.png``; returns the PNG paths (none when no run has uncertainty)."""
    rows = _with_uncertainty(runs)
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    out_dir = Path(out_dir)
    paths = []
    n = len(rows)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.2), squeeze=False, sharey=True)
    for ax, (r, u) in zip(axes[0], rows):
        s = _last_stage(u)
        count, conf, correct = _pooled_bins(u, s)
        K = count.shape[0]
        edges = np.linspace(0, 1, K + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        has = count > 0
        acc = np.where(has, correct / np.maximum(count, 1), 0.0)
        mean_conf = np.where(has, conf / np.maximum(count, 1), np.nan)
        ax.bar(centers[has], acc[has], width=1.0 / K, edgecolor="black", lw=0.5, color="tab:blue", label="accuracy")
        lo = np.minimum(acc, np.nan_to_num(mean_conf))
        ax.bar(centers[has], np.abs(mean_conf - acc)[has], bottom=lo[has], width=1.0 / K, color="tab:red",
               alpha=0.3, edgecolor="tab:red", lw=0.5, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        frac = count / max(count.sum(), 1)
        ax.step(edges, np.r_[frac, frac[-1]], where="post", color="gray", lw=0.8, label="fraction of examples")
        ax.set_title(f"{r['strategy']}\nECE {100 * seen_ece(u, s):.2f}% (after task {s + 1})",
                     fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=6, loc="upper left")
    p = out_dir / "reliability.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    styles = {"old": "-", "current": "--", "unseen": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for k, (r, u) in enumerate(rows):
        c = colors[k % len(colors)]
        split = epistemic_split(u)
        x = np.arange(1, len(split["old"]) + 1)
        for name, ls in styles.items():
            ax.plot(x, split[name], ls, color=c, marker="o", ms=3)
        handles.append(Line2D([], [], color=c, label=r["strategy"]))
    handles += [Line2D([], [], color="black", ls=ls, label=f"{name} tasks") for name, ls in styles.items()]
    ax.set_xlabel("tasks trained")
    ax.set_xticks(range(1, len(rows[0][1]["epistemic"][0]) + 1))
    ax.set_ylabel("epistemic uncertainty (MI, nats)")
    ax.set_title("epistemic uncertainty on old / current / unseen tasks", fontsize=9)
    ax.legend(handles=handles, fontsize=6, loc="best")
    p = out_dir / "epistemic_over_time.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)
    return paths
