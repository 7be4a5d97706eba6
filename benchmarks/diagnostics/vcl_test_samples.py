"""How many Monte Carlo samples VCLCallback's prediction needs: validation accuracy and NLL against ``test_samples``.

Trains ``VCLCallback()`` (the default) through a stream the way ``bayescl bench`` does (Adam 1e-3, batch 64, one
Trainer per task, 10 % of each task's training data held out), then scores the final posterior on every task's
validation data with ``test_samples`` = 1, 3, 10, 30, 100, each with 3 draws of the noise (the spread is the Monte
Carlo error). No test data is read.

    python benchmarks/diagnostics/vcl_test_samples.py --root ../shared/data \
        > benchmarks/results/diagnostics/vcl_test_samples.txt
"""

from __future__ import annotations

import statistics
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _stream import fit_task, parser, start

from bayescl import ClassifierModule, VCLCallback, make_stream
from bayescl._batches import split_batch
from bayescl.harness.bench import default_model
from bayescl.methods.variational_predictive import predictive_samples

SAMPLES = (1, 3, 10, 30, 100)


@torch.no_grad()
def score(module, cb, loaders, samples: int, draw: int) -> tuple[float, float]:
    """Accuracy (%) and NLL (nats) over all validation examples of ``loaders``, one draw of the noise."""
    module.eval()
    correct, nll, n = 0, 0.0, 0
    with predictive_samples(module, samples):
        for li, loader in enumerate(loaders):
            for b, batch in enumerate(loader):
                cb.seed_noise(module, 3, draw, li, b)
                inputs, y = split_batch(batch)
                logp = module(*inputs)  # log of the mean softmax over the samples (S = 1 included)
                correct += int((logp.argmax(-1) == y).sum())
                nll += float(F.nll_loss(logp, y, reduction="sum"))
                n += len(y)
    return 100 * correct / n, nll / n


def run(scenario: str, model: str, root: str | None, epochs: int, seed: int) -> list[str]:
    pl.seed_everything(seed, verbose=False)
    stream = make_stream(scenario, root=root, seed=seed, val_fraction=0.1)
    module = ClassifierModule(default_model(stream, model), num_tasks=len(stream))
    cb = VCLCallback()
    t0 = time.perf_counter()
    for task in stream:
        fit_task(module, cb, task, epochs, seed)
    train_s = time.perf_counter() - t0
    loaders = [t.val_dataloader() for t in stream]
    lines = [f"## {scenario} ({model}, {len(stream)} tasks, {epochs} epochs, seed {seed}; training {train_s:.0f} s)",
             "", "| test_samples | val accuracy (%), 3 draws | NLL (nats) | seconds per evaluation |",
             "|---|---|---|---|"]
    for s in SAMPLES:
        accs, nlls = [], []
        t = time.perf_counter()
        for draw in range(3):
            a, ll = score(module, cb, loaders, s, draw)
            accs.append(a)
            nlls.append(ll)
        sec = (time.perf_counter() - t) / 3
        lines.append(f"| {s} | {statistics.mean(accs):.2f} ({min(accs):.2f}–{max(accs):.2f}) | "
                     f"{statistics.mean(nlls):.4f} | {sec:.1f} |")
    return lines


def main(argv=None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--runs", nargs="+", default=["split-mnist-domain:mlp", "split-mnist-task:mlp",
                                                  "split-fashion-task:cnn-bn"],
                    help="scenario:model pairs")
    args = ap.parse_args(argv)
    start()
    for spec in args.runs:
        scenario, model = spec.split(":")
        print("\n".join(run(scenario, model, args.root, args.epochs, args.seed)) + "\n", flush=True)


if __name__ == "__main__":
    main()
