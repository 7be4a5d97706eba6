"""Training-step and curvature-pass cost of LaplaceCallback, as ratios to a naive run in the same process.

Split-MNIST task-IL, multi-head MLP 2x256, batch 64, Adam 1e-3 (the harness protocol). For every method the model
is fitted on task 1 (which closes a task and builds the posterior), then fitted on task 2 while a timing callback
records every training step (forward, backward, the prior term in on_before_optimizer_step, optimizer step).
Methods run interleaved for ``--rounds`` rounds; the step time is the median over all steps, the ratio is to
naive's median. The curvature pass (end_task on task 2's data) is timed against one naive training epoch.

    python benchmarks/laplace_overhead.py --root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bayescl import ClassifierModule, LaplaceCallback, MultiHeadMLP, make_stream

METHODS = {
    "naive": None,
    "diag": {"structure": "diag", "lam": 100.0},
    "kron": {"structure": "kron", "lam": 100.0, "online": True},
    "kron rank 32": {"structure": "kron", "lam": 100.0, "online": True, "rank": 32},
    "kron rank 16 + diag": {"structure": "kron", "lam": 100.0, "online": True, "rank": 16, "rank_diagonal": True},
    "kron rank 32 + diag": {"structure": "kron", "lam": 100.0, "online": True, "rank": 32, "rank_diagonal": True},
}


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(1000 * (time.perf_counter() - self._t))


def trainer(callbacks, epochs=1):
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def one_round(name, kwargs, stream, batch_size):
    torch.manual_seed(0)
    module = ClassifierModule(MultiHeadMLP(), num_tasks=len(stream))
    cbs = [] if kwargs is None else [LaplaceCallback(**kwargs)]
    loaders = [DataLoader(t.train, batch_size=batch_size, shuffle=True) for t in stream]
    trainer(cbs).fit(module, loaders[0])
    timer = StepTimer()
    if cbs:
        cbs[0].auto_end_task = False
    t0 = time.perf_counter()
    trainer([*cbs, timer]).fit(module, loaders[1])
    epoch_s = time.perf_counter() - t0
    out = {"steps_ms": timer.times[5:], "epoch_s": epoch_s}
    if cbs:
        for bs in (batch_size, 512):
            cbs[0].curvature_batch_size = bs
            cbs[0].end_task_seconds = 0.0
            cbs[0].end_task(None, module, loaders[1])
            out[f"curvature_s_batch{bs}"] = cbs[0].end_task_seconds
    return out


def overhead_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options the step-time benchmarks share (this one and vcl_overhead.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--root", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=out)
    return ap


def main(argv=None) -> None:
    ap = overhead_parser(__doc__, "benchmarks/results/laplace_overhead")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="methods to time (naive is always included: the ratios divide by it)")
    args = ap.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    stream = make_stream("split-mnist-task", root=args.root)
    stream.tasks = stream.tasks[:2]
    runs = {m: [] for m in METHODS if m == "naive" or m in args.methods}
    for r in range(args.rounds):
        for m, rs in runs.items():
            rs.append(one_round(m, METHODS[m], stream, args.batch_size))
            print(f"round {r + 1}/{args.rounds} {m}: median step {statistics.median(rs[-1]['steps_ms']):.3f} ms",
                  flush=True)
    base = statistics.median(t for run in runs["naive"] for t in run["steps_ms"])
    epoch = statistics.median(run["epoch_s"] for run in runs["naive"])
    res = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "naive_step_ms": base, "naive_epoch_s": epoch, "methods": {}}
    for m, rs in runs.items():
        step = statistics.median(t for run in rs for t in run["steps_ms"])
        row = {"step_ms": step, "step_ratio": step / base}
        for k in rs[0]:
            if k.startswith("curvature_s"):
                row[k] = statistics.median(run[k] for run in rs)
                row[k.replace("_s_", "_epochs_")] = row[k] / epoch
        res["methods"][m] = row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    lines = ["# LaplaceCallback overhead (split-MNIST task-IL, MLP 2x256, batch 64, CPU)", "",
             (f"Command: `{res['command']}` — torch {res['torch']}, {res['threads']} threads, {args.rounds} rounds "
              f"interleaved; naive step {base:.3f} ms, naive epoch {epoch:.2f} s."), "",
             "| method | step (ms) | step / naive | curvature pass / epoch (batch 64) | (batch 512) |",
             "|---|---|---|---|---|"]
    for m, row in res["methods"].items():
        c64 = row.get(f"curvature_epochs_batch{args.batch_size}")
        c512 = row.get("curvature_epochs_batch512")
        fmt = lambda v: "—" if v is None else f"{v:.2f}"
        lines.append(f"| {m} | {row['step_ms']:.3f} | {row['step_ratio']:.2f} | {fmt(c64)} | {fmt(c512)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
