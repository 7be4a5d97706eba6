"""Training-step cost of VCLCallback as a ratio to a naive run in the same process (interleaved rounds).

Split-MNIST task-IL, multi-head MLP 2x256, batch 64, Adam 1e-3 (the harness protocol). Each method fits task 1
(for VCL: the maximum-likelihood epoch is switched off, so every step is variational), then task 2 while a
timing callback records every training step; the ratio is of medians. ``train_samples=10`` is the paper's
number of Monte Carlo samples per step, run as one pass over the batch repeated 10 times (the default) or as 10
passes (``vectorize_samples=False``).

    python benchmarks/vcl_overhead.py --root ../shared/data
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from laplace_overhead import StepTimer, overhead_parser, trainer

from bayescl import ClassifierModule, MultiHeadMLP, VCLCallback, make_stream

#: name -> (train_samples, vectorize_samples); None: no VCL.
METHODS = {"naive": None, "vcl, 1 sample": (1, True), "vcl, 10 samples (one pass over the repeated batch)": (10, True),
           "vcl, 10 samples (10 passes)": (10, False)}


def one_round(samples, stream, batch_size):
    torch.manual_seed(0)
    module = ClassifierModule(MultiHeadMLP(), num_tasks=len(stream))
    cbs = [] if samples is None else [VCLCallback(train_samples=samples[0], vectorize_samples=samples[1],
                                                  ml_init=False, test_samples=1)]
    loaders = [DataLoader(t.train, batch_size=batch_size, shuffle=True) for t in stream]
    trainer(cbs).fit(module, loaders[0])
    timer = StepTimer()
    t0 = time.perf_counter()
    trainer([*cbs, timer]).fit(module, loaders[1])
    return {"steps_ms": timer.times[5:], "epoch_s": time.perf_counter() - t0}


def main(argv=None) -> None:
    ap = overhead_parser(__doc__, "benchmarks/results/vcl_overhead")
    args = ap.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    stream = make_stream("split-mnist-task", root=args.root)
    stream.tasks = stream.tasks[:2]
    runs = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for m, k in METHODS.items():
            runs[m].append(one_round(k, stream, args.batch_size))
            print(f"round {r + 1}/{args.rounds} {m}: median step {statistics.median(runs[m][-1]['steps_ms']):.3f} ms",
                  flush=True)
    base = statistics.median(t for run in runs["naive"] for t in run["steps_ms"])
    res = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "naive_step_ms": base, "methods": {}}
    for m, rs in runs.items():
        step = statistics.median(t for run in rs for t in run["steps_ms"])
        res["methods"][m] = {"step_ms": step, "step_ratio": step / base}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    lines = ["# VCLCallback step time (split-MNIST task-IL, MLP 2x256, batch 64, CPU)", "",
             (f"Command: `{res['command']}` — torch {res['torch']}, {res['threads']} threads, {args.rounds} rounds "
              f"interleaved; naive step {base:.3f} ms."), "", "| method | step (ms) | step / naive |", "|---|---|---|"]
    lines += [f"| {m} | {row['step_ms']:.3f} | {row['step_ratio']:.2f} |" for m, row in res["methods"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
