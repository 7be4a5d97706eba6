"""Does the epistemic AUROC depend on how many Monte Carlo samples estimate the mutual information?

The harness reports, per stage, the AUROC of the epistemic part of the predictive entropy (the mutual information
``H[E p] - E H[p]``) for trained-task against future-task inputs, from ``n_samples = 16`` samples of the
predictive (``bayescl.uncertainty.evaluate_uncertainty``). An MI estimated from few samples is noisy, and for
inputs whose true MI is small the noise can swamp the ranking. This trains the default callback through a stream
the way ``bayescl bench`` does (Adam 1e-3, batch 64, one Trainer per task, 10 % of each task's training data held
out) and, after every task, computes that AUROC on the **validation** inputs (500 per task) with 16, 64 and 256
samples, each with 2 draws of the samples. No test data is read.

    python benchmarks/diagnostics/epistemic_samples.py --root ../shared/data \
        > benchmarks/results/diagnostics/epistemic_samples.txt
"""

from __future__ import annotations

import time

import torch
from _stream import default_setup, fit_task, main_over_runs

from bayescl.methods.predictive_samples import posterior_for
from bayescl.methods.uncertainty import evaluate_uncertainty

SAMPLES = (16, 64, 256)
DRAWS = 2


def run(scenario: str, method: str, root: str | None, epochs: int, seed: int) -> list[str]:
    stream, module, cb, val = default_setup(scenario, method, root, seed)
    rows = {s: [] for s in SAMPLES}
    t0 = time.perf_counter()
    for i, task in enumerate(stream):
        fit_task(module, cb, task, epochs, seed)
        if i == len(stream) - 1:
            break  # no future task left to tell apart
        posterior = posterior_for([cb], module)
        for s in SAMPLES:
            draws = []
            for d in range(DRAWS):  # the same 500 inputs per task, other samples
                if posterior is None:  # VCL: the layers draw their noise themselves
                    cb.seed_noise(module, 4, s, i, d)
                rec = evaluate_uncertainty(module, posterior, val, stage=i, n_samples=s, seed=seed,
                                           generator=torch.Generator().manual_seed(1_000 * d + 1))
                draws.append(rec["auroc_epistemic"])
            rows[s].append(draws)
    total = time.perf_counter() - t0
    stages = len(rows[SAMPLES[0]])
    title = f"## {scenario}, {type(cb).__name__}() ({len(stream)} tasks, {epochs} epochs, seed {seed}; {total:.0f} s)"
    lines = [title, "",
             "| samples | " + " | ".join(f"after task {i + 1}" for i in range(stages)) + " |",
             "|---|" + "---|" * stages]
    for s in SAMPLES:
        cells = [f"{sum(d) / len(d):.3f} ({min(d):.3f}–{max(d):.3f})" for d in rows[s]]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    main_over_runs(__doc__, run, ["permuted-mnist:vcl:3", "split-mnist-domain:vcl:5", "split-mnist-domain:laplace:5"],
                   argv)


if __name__ == "__main__":
    main()
