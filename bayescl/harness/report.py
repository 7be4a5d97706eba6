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
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bayescl.harness.report_published import PUBLISHED
from bayescl.harness.report_uncertainty import (
    accuracy_warnings,
    epistemic_split,
    plot_uncertainty,
    stage_table,
    uncertainty_arrays,
    uncertainty_table,
)

__all__ = ["ORDER", "PUBLISHED", "accuracy_warnings", "epistemic_split", "load_results", "markdown_table",
           "overview_markdown", "plot_scenario", "plot_uncertainty", "stage_table", "uncertainty_arrays",
           "uncertainty_table", "write_report"]

#: strategies listed first in every table, in this order
ORDER = ("naive", "joint")


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


def _pm(r: dict[str, Any], key: str, scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std`` of ``r[key]`` over the seeds; the mean alone for one seed (a std of one value is no
    information, "± 0.00" read as a precise result)."""
    stat = r[key]
    if len(r.get("seeds", [])) == 1:
        return f"{scale * stat['mean']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def markdown_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| strategy | avg accuracy (%) | BWT (%) | forgetting (%) | seeds | epochs/task | wall s/seed | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        cfg = r.get("config", {})
        lines.append(
            f"| {r['strategy']} | {_pm(r, 'avg_accuracy')} | {_pm(r, 'bwt')} "
            f"| {_pm(r, 'forgetting' if 'forgetting' in r else 'bwt')}"
            f" | {len(r['seeds'])} | {cfg.get('epochs', '?')} | {r['wall_seconds']['mean']:.1f} "
            f"| {r.get('peak_rss_mb', float('nan')):.0f} |"
        )
    return "\n".join(lines)


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
            text.append(f"| **{r['strategy']}** | {_pm(r, 'avg_accuracy')} | {r['wall_seconds']['mean']:.1f} "
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
            note = ("Predictive uncertainty after the last task on the tasks seen (Monte Carlo posterior predictive: "
                    "'posterior (glm)' = samples of the linearised predictive of the callback's "
                    "predictive_posterior(), '(mc)' = weight samples through the network, 'model' = the variational "
                    "layers' own weight samples, 'point' = the network's softmax; network and predictive accuracy on "
                    "the same examples; ECE over the pooled confidence bins of all seeds and seen tasks, as in the "
                    "reliability diagrams; entropies in nats, total = aleatoric + epistemic; 'old tasks': all but "
                    "the last one; mean ± std over seeds, the value alone for one seed):")
            text += [note, "", unc, ""]
            for w in accuracy_warnings(runs):
                warnings.warn(f"bayescl report: {w}", stacklevel=2)
                text += [f"**Warning**: {w}", ""]
            text += [("Per stage, on the tasks seen: AUROC of the epistemic (and total) uncertainty for telling "
                      "inputs of future tasks from inputs of trained ones (1 = every future input is more uncertain, "
                      "0.5 = no separation; none after the last task):"), "", stage_table(runs), ""]
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
