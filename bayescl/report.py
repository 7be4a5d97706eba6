"""Tables and plots from the harness's JSON results.

``bayescl report benchmarks/results`` rewrites, for every scenario folder, ``README.md`` (a markdown table across
strategies with the commands that produced them) and PNG plots: the mean accuracy-matrix heatmap of each
strategy and the per-task accuracy over the course of the stream.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

ORDER = ("naive", "joint")


def load_results(scenario_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for p in sorted(scenario_dir.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p} is not valid JSON ({exc}).") from exc
        if "accuracy_matrix" in doc and "strategy" in doc:
            runs.append(doc)
    key = lambda r: (ORDER.index(r["strategy"]) if r["strategy"] in ORDER else len(ORDER), r["strategy"])  # noqa: E731
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


def write_report(results_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write ``README.md`` (and plots) into each scenario folder of ``results_dir``; returns the files written."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ValueError(f"results_dir={str(results_dir)!r} is not a folder.")
    written = []
    for d in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        runs = load_results(d)
        if not runs:
            continue
        pngs = plot_scenario(runs, d) if plots else []
        text = [f"# {d.name}", "", markdown_table(runs), "", "Commands:", ""]
        text += [f"- `{r['strategy']}`: `{r['command']}`" for r in runs]
        text += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
        (d / "README.md").write_text("\n".join(text) + "\n")
        written += [d / "README.md", *pngs]
    return written
