"""Tables and plots from the harness's JSON results.

``bayescl report benchmarks/results`` rewrites, for every scenario folder (any folder below the results folder that
holds result JSON files), ``README.md`` (a markdown table across strategies with the commands that produced them)
and PNG plots: the mean accuracy-matrix heatmap of each strategy and the per-task accuracy over the course of the
stream. When the per-seed results carry an ``"uncertainty"`` section (stage records of
:func:`bayescl.methods.uncertainty.evaluate_uncertainty`), it adds an uncertainty table, reliability diagrams
(``reliability.png``) and the epistemic uncertainty on old / current / unseen tasks over the stream
(``epistemic_over_time.png``).

It also writes ``README.md`` at the top of the results folder: every scenario's accuracy beside the published
numbers of :data:`PUBLISHED` (with their sources and protocols), linking the scenario pages and plots.

JSON files of another schema (an Avalanche run's export, a config file) are skipped; so is a malformed
uncertainty section (the accuracy report is still written).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ORDER = ("naive", "joint")

_NGUYEN = "Nguyen et al. 2018 (VCL, ICLR)"
_HSU = "Hsu et al. 2018 (Re-evaluating continual learning scenarios)"
_AVA = "Avalanche reproduced baselines (continual-learning-baselines)"
_PEER = "peer measured on this machine (DESIGN.md)"
_VCL_SPLIT = "multi-head MLP 2x256, 120 epochs, full batch, Adam 1e-3"
_VCL_PERM = "single head MLP 2x100, 100 epochs, batch 256, coreset 200/task"
_HSU_P = "MLP 2x400, Adam 1e-3, batch 128"
_PEER_SPLIT = "multi-head 2x256, 5 epochs, batch 64, Adam 1e-3"
_PEER_PERM = "10 tasks, 2x100, 3 epochs, batch 256, Adam 1e-3"
_PEER_DOM = "one 2-way head, 2x256, 5 epochs, batch 64, Adam 1e-3"


def _p(method: str, acc: float | None, source: str, protocol: str, wall: float | None = None,
       approx: bool = False) -> dict[str, Any]:
    return {"method": method, "accuracy": acc, "source": source, "protocol": protocol, "wall_seconds": wall,
            "approx": approx}


#: Published and peer accuracies (%, average over tasks after the last one) per scenario, with their sources and
#: protocols (see DESIGN.md, "Published numbers"). ``wall_seconds`` only for peers measured here; ``approx``: the
#: paper gives the number only approximately (read off a figure).
PUBLISHED: dict[str, list[dict[str, Any]]] = {
    "split-mnist-task": [
        _p("VCL", 97.0, _NGUYEN, _VCL_SPLIT),
        _p("VCL + coreset (40/task)", 98.4, _NGUYEN, _VCL_SPLIT),
        _p("EWC", 63.1, _NGUYEN, _VCL_SPLIT),
        _p("SI", 98.9, _NGUYEN, _VCL_SPLIT),
        _p("LP (Laplace propagation)", 61.2, _NGUYEN, _VCL_SPLIT),
        _p("online EWC", 98.04, _HSU, _HSU_P),
        _p("SI", 98.56, _HSU, _HSU_P),
        _p("offline (joint)", 99.52, _HSU, _HSU_P),
        _p("SI", 97.0, _AVA, "Avalanche's split-MNIST task-IL protocol"),
        _p("Avalanche Naive", 94.83, _PEER, _PEER_SPLIT, 19.0),
        _p("Avalanche EWC λ=1e4", 99.23, _PEER, _PEER_SPLIT, 28.8),
        _p("Avalanche SI λ=1", 95.01, _PEER, _PEER_SPLIT, 31.4),
    ],
    "split-mnist-domain": [
        _p("online EWC", 57.33, _HSU, _HSU_P),
        _p("SI", 64.76, _HSU, _HSU_P),
        _p("offline (joint)", 98.59, _HSU, _HSU_P),
        _p("Avalanche Naive", 58.96, _PEER, _PEER_DOM, 11.4),
        _p("Avalanche EWC λ=1e3", 62.28, _PEER, _PEER_DOM, 16.9),
        _p("Avalanche EWC λ=1e4", 63.77, _PEER, _PEER_DOM, 17.8),
        _p("Avalanche EWC λ=1e5", 65.34, _PEER, _PEER_DOM, 18.7),
        _p("plain loop, naive", 55.04, _PEER, _PEER_DOM, 6.6),
        _p("laplace-torch online KFAC", 63.60, _PEER, _PEER_DOM, 53.9),
    ],
    "split-mnist-class": [
        _p("online EWC", 19.77, _HSU, _HSU_P),
        _p("SI", 19.67, _HSU, _HSU_P),
        _p("offline (joint)", 97.53, _HSU, _HSU_P),
    ],
    "permuted-mnist": [
        _p("VCL", 90.0, _NGUYEN, _VCL_PERM, approx=True),
        _p("VCL + coreset", 93.0, _NGUYEN, _VCL_PERM, approx=True),
        _p("EWC", 84.0, _NGUYEN, _VCL_PERM),
        _p("SI", 86.0, _NGUYEN, _VCL_PERM),
        _p("LP (Laplace propagation)", 82.0, _NGUYEN, _VCL_PERM),
        _p("FROMP", 94.9, "Pan et al. 2020 (FROMP)", "10 tasks, MLP 2x100"),
        _p("EWC", 83.0, _AVA, "Avalanche's permuted-MNIST protocol"),
        _p("plain PyTorch loop, naive", 59.43, _PEER, _PEER_PERM, 17.7),
        _p("plain Lightning, new Trainer per task, naive", 44.14, _PEER, _PEER_PERM, 20.2),
        _p("laplace-torch 0.3 online KFAC", 94.47, _PEER, _PEER_PERM, 81.4),
        _p("laplace-torch 0.3 online diag (exact GGN)", None, _PEER, _PEER_PERM + "; stopped after an hour", None),
        _p("Avalanche Naive", 62.18, _PEER, _PEER_PERM, 64.8),
        _p("Avalanche EWC λ=1e3", 82.03, _PEER, _PEER_PERM, 97.7),
        _p("Avalanche EWC λ=1e4", 56.53, _PEER, _PEER_PERM, 92.6),
        _p("Avalanche SI (no effect)", 62.18, _PEER, _PEER_PERM, 80.1),
    ],
}


# --------------------------------------------------------------------------------------------------- loading
def _is_result(doc: Any) -> bool:
    """Whether ``doc`` has the harness's schema (other JSON files, e.g. Avalanche exports, are skipped)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("strategy"), str):
        return False
    try:
        R = np.array(doc["accuracy_matrix"], dtype=float)
        ok = R.ndim == 3 and R.shape[1] == R.shape[2] and R.shape[0] >= 1
        for key in ("avg_accuracy", "bwt"):
            float(doc[key]["mean"]), float(doc[key]["std"])
        float(doc["wall_seconds"]["mean"])
        return ok and isinstance(doc.get("seeds"), list)
    except (KeyError, TypeError, ValueError):
        return False


def load_results(scenario_dir: Path) -> list[dict[str, Any]]:
    """The harness's result documents in ``scenario_dir`` (files of another schema are skipped), in table order."""
    runs = []
    for p in sorted(Path(scenario_dir).glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p} is not valid JSON ({exc}).") from exc
        if _is_result(doc):
            runs.append(doc)
    key = lambda r: (ORDER.index(r["strategy"]) if r["strategy"] in ORDER else len(ORDER), r["strategy"])
    return sorted(runs, key=key)


def _pm(stat: dict[str, float], scale: float = 100.0, digits: int = 2) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def markdown_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| strategy | avg accuracy (%) | BWT (%) | forgetting (%) | seeds | epochs/task | wall s/seed | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        cfg = r.get("config", {})
        lines.append(
            f"| {r['strategy']} | {_pm(r['avg_accuracy'])} | {_pm(r['bwt'])} | {_pm(r.get('forgetting', r['bwt']))}"
            f" | {len(r['seeds'])} | {cfg.get('epochs', '?')} | {r['wall_seconds']['mean']:.1f} "
            f"| {r.get('peak_rss_mb', float('nan')):.0f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- uncertainty
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


# --------------------------------------------------------------------------------------------------- accuracy plots
def plot_scenario(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Heatmaps of the mean accuracy matrix per strategy and per-task accuracy curves; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    n = len(runs)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, r in zip(axes[0], runs):
        R = 100 * np.nanmean(np.array(r["accuracy_matrix"], dtype=float), axis=0)
        im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
        T = R.shape[0]
        for i in range(T):
            for j in range(T):
                ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if R[i, j] < 60 else "black")
        ax.set_title(r["strategy"], fontsize=9)
        ax.set_xlabel("evaluated task")
        ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
        ax.set_yticks(range(T), [str(i + 1) for i in range(T)])
    axes[0][0].set_ylabel("after training task")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy (%)")
    p = out_dir / "accuracy_matrix.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], runs):
        R = 100 * np.nanmean(np.array(r["accuracy_matrix"], dtype=float), axis=0)
        T = R.shape[0]
        for j in range(T):
            ax.plot(range(j + 1, T + 1), R[j:, j], marker="o", ms=3, label=f"task {j + 1}")
        ax.plot(range(1, T + 1), [R[i, : i + 1].mean() for i in range(T)], "k--", lw=1.5, label="mean seen")
        ax.set_title(r["strategy"], fontsize=9)
        ax.set_xlabel("tasks trained")
        ax.set_xticks(range(1, T + 1))
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=6, loc="lower left")
    p = out_dir / "accuracy_over_time.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)
    return paths


# --------------------------------------------------------------------------------------------------- top-level page
def _protocol(r: dict[str, Any]) -> str:
    cfg = r.get("config", {})
    parts = [f"{cfg.get('model', '?')}", f"{cfg.get('epochs', '?')} epochs/task", f"batch {cfg.get('batch_size', '?')}",
             f"Adam {cfg.get('lr', '?')}", f"{len(r['seeds'])} seed(s)"]
    if cfg.get("num_tasks"):
        parts.append(f"{cfg['num_tasks']} tasks")
    if cfg.get("limit"):
        parts.append(f"{cfg['limit']} examples/task")
    return ", ".join(parts)


def overview_markdown(scenarios: list[tuple[str, list[dict[str, Any]], list[str]]]) -> str:
    """The top-level page: per scenario (``(relative folder, runs, png file names)``) our accuracy beside the
    published and peer numbers of :data:`PUBLISHED`."""
    text = [
        "# Benchmark results",
        "",
        ("Average accuracy over all tasks after the last one (%; ours: mean ± std over seeds), beside published "
         "numbers and peers measured on this machine. Protocols differ (epochs, batch size, network): the protocol "
         "column says what each number used. Written by `bayescl report` from the JSON files in each folder."),
        "",
    ]
    for rel, runs, pngs in scenarios:
        scenario = runs[0].get("scenario", Path(rel).name) if runs else Path(rel).name
        text += [f"## {rel}", ""]
        links = [f"[table and commands]({rel}/README.md)"] + [f"[{Path(p).stem.replace('_', ' ')}]({rel}/{p})"
                                                             for p in pngs]
        text += [" · ".join(links), ""]
        text += ["| method | avg accuracy (%) | wall s/seed | source | protocol |", "|---|---|---|---|---|"]
        for r in runs:
            text.append(f"| **{r['strategy']}** | {_pm(r['avg_accuracy'])} | {r['wall_seconds']['mean']:.1f} "
                        f"| this repo (bayescl) | {_protocol(r)} |")
        for e in PUBLISHED.get(scenario, []):
            acc = "—" if e["accuracy"] is None else f"{e['accuracy']:.2f}"
            acc = f"~{e['accuracy']:g}" if e.get("approx") and e["accuracy"] is not None else acc
            wall = "" if e["wall_seconds"] is None else f"{e['wall_seconds']:.1f}"
            text.append(f"| {e['method']} | {acc} | {wall} | {e['source']} | {e['protocol']} |")
        text.append("")
        text += [f"![{rel} {Path(p).stem}]({rel}/{p})" for p in pngs if p == "accuracy_over_time.png"]
        text.append("")
    if not scenarios:
        text += ["No results yet: run `bayescl bench ...` first.", ""]
    return "\n".join(text)


def _scenario_dirs(results_dir: Path) -> list[Path]:
    return sorted(p for p in results_dir.rglob("*") if p.is_dir() and any(p.glob("*.json")))


def write_report(results_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write ``README.md`` (and plots) into each scenario folder below ``results_dir`` and the overview
    ``results_dir/README.md``; returns the files written."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ValueError(f"results_dir={str(results_dir)!r} is not a folder.")
    written: list[Path] = []
    scenarios = []
    for d in _scenario_dirs(results_dir):
        runs = load_results(d)
        if not runs:
            continue
        pngs = plot_scenario(runs, d) if plots else []
        upngs = plot_uncertainty(runs, d) if plots else []
        text = [f"# {d.name}", "", markdown_table(runs), ""]
        unc = uncertainty_table(runs)
        if unc:
            note = ("Predictive uncertainty after the last task (Monte Carlo posterior predictive: 'posterior' = "
                    "samples of the linearised predictive of the callback's predictive_posterior(), 'model' = the "
                    "variational layers' own weight samples, 'point' = the network's softmax; entropies in nats, "
                    "total = aleatoric + epistemic; 'old tasks': all but the last one):")
            text += [note, "", unc, ""]
        text += ["Commands:", ""]
        text += [f"- `{r['strategy']}`: `{r['command']}`" for r in runs]
        text += [""] + [f"![{p.stem}]({p.name})" for p in [*pngs, *upngs]]
        (d / "README.md").write_text("\n".join(text) + "\n")
        written += [d / "README.md", *pngs, *upngs]
        scenarios.append((d.relative_to(results_dir).as_posix(), runs, [p.name for p in [*pngs, *upngs]]))
    if scenarios:
        top = results_dir / "README.md"
        top.write_text(overview_markdown(scenarios))
        written.append(top)
    return written
