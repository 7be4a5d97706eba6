"""Where the epistemic uncertainty is high: on the task just trained, on the older tasks, on the tasks to come
(issue 16: why the AUROC of "trained vs future tasks" stays below 0.85 on split-MNIST domain-IL).

The AUROC of the harness counts every task trained so far as "trained", including old tasks the network has since
forgotten. This script reads the per-task records of finished runs (``"uncertainty"`` in a result JSON, written by
``bayescl bench --uncertainty``; nothing is trained or re-evaluated) and prints, per stage and averaged over the
run's seeds: the AUROC, the mean epistemic part of the predictive entropy (mutual information, nats) on the task
just trained, on the older trained tasks and on the future tasks, and the network's accuracy on the first two groups.
If the older tasks' epistemic uncertainty is as high as the future tasks', the AUROC falls with forgetting, and the
uncertainty is high exactly where the network is wrong.

    python benchmarks/diagnostics/epistemic_groups.py [RESULT.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RUNS = [
    "defaults/split-mnist-domain/laplace-normalized.json",
    "defaults/split-mnist-domain/laplace-normalized-lam1.json",
    "defaults/split-mnist-domain/laplace-kron-lr-3seeds.json",
    "defaults/split-mnist-domain/vcl-default.json",
    "function-space-tuned/split-mnist-domain/fromp-200-tau100.json",
    "defaults/permuted-mnist/laplace-normalized.json",
    "defaults/permuted-mnist/vcl-default.json",
]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def stage_rows(result: dict) -> list[list[float]]:
    """Per stage but the last: AUROC, epistemic on the last / older / future tasks, accuracy on the last / older
    tasks, each the mean over the seeds that recorded uncertainty."""
    runs = [r["uncertainty"] for r in result["per_seed"] if r.get("uncertainty")]
    if not runs:
        raise ValueError("the result has no uncertainty records (run bayescl bench with --uncertainty).")
    rows = []
    for i in range(len(runs[0]) - 1):
        per_seed = []
        for stages in runs:
            tasks = stages[i]["tasks"]
            old, last, future = tasks[:i], tasks[i], tasks[i + 1:]
            per_seed.append([stages[i]["auroc_epistemic"], last["epistemic"], _mean([t["epistemic"] for t in old]),
                             _mean([t["epistemic"] for t in future]), 100 * last["net_accuracy"],
                             _mean([100 * t["net_accuracy"] for t in old])])
        rows.append(np.array(per_seed, dtype=float).mean(axis=0).tolist())  # NaN only where no older task
    return rows


def table(path: Path) -> str:
    result = json.loads(path.read_text())
    seeds = sum(1 for r in result["per_seed"] if r.get("uncertainty"))
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    header = ("| after task | AUROC | epistemic: just trained | older tasks | future tasks | accuracy: just trained "
              "| older tasks |")
    lines = [f"{name} ({result['strategy']}, {seeds} seed(s), test inputs)", "", header, "|---|---|---|---|---|---|---|"]
    for i, (auroc, e_last, e_old, e_future, a_last, a_old) in enumerate(stage_rows(result)):
        old = "–" if np.isnan(e_old) else f"{e_old:.4f}"
        acc_old = "–" if np.isnan(a_old) else f"{a_old:.1f}"
        lines.append(f"| {i + 1} | {auroc:.2f} | {e_last:.4f} | {old} | {e_future:.4f} | {a_last:.1f} | {acc_old} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for p in paths or [str(ROOT / r) for r in RUNS]:
        path = Path(p).resolve()
        if not path.exists():
            print(f"{p}: missing (run its bench command first)\n")
            continue
        print(table(path) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
