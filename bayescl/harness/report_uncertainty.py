"""The uncertainty part of the report: per-stage records of
:func:`bayescl.methods.uncertainty.evaluate_uncertainty` stacked over seeds, a table after the last task, reliability
diagrams and the epistemic uncertainty on old / current / unseen tasks over the stream.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

_UNC_STATS = ("accuracy", "total", "aleatoric", "epistemic", "nll", "ece", "count")
_BINS = ("bin_count", "bin_confidence", "bin_correct")


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
    """After the last task: NLL, ECE and the entropy decomposition on the tasks seen (means over seeds and tasks),
    and the epistemic part on old tasks vs the last one; empty string when no run has uncertainty."""
    rows = _with_uncertainty(runs)
    if not rows:
        return ""
    lines = [
        ("| strategy | predictive | NLL (nats) | ECE (%) | total H | aleatoric | epistemic | epistemic old tasks "
         "| epistemic last task | seeds |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, u in rows:
        s = _last_stage(u)
        seen = {k: _nanmean(u[k][:, s, : s + 1]) for k in ("nll", "ece", "total", "aleatoric", "epistemic")}
        split = epistemic_split(u)
        src = "/".join(str(x) for x in u["source"])
        lines.append(
            f"| {r['strategy']} | {src} | {seen['nll']:.3f} | {100 * seen['ece']:.2f} | {seen['total']:.3f} "
            f"| {seen['aleatoric']:.3f} | {seen['epistemic']:.4f} | {split['old'][s]:.4f} "
            f"| {split['current'][s]:.4f} | {u['count'].shape[0]} |"
        )
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
        ax.set_title(f"{r['strategy']}\nECE {100 * _ece(count, conf, correct):.2f}% (after task {s + 1})",
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
