"""Cost of the function-space prior per training step, measured beside naive in one run.

A single-head MLP (784-256-256-10, the domain/class-IL reference network) trains on random MNIST-shaped batches
with Adam. ``--tasks`` past tasks of ``--points`` stored points each are function sites
(:class:`bayescl.methods.functional.FunctionalSite`); one step is forward, backward, then
:meth:`FunctionalPriorCallback.add_prior_grad` (the term's gradient, as in ``on_before_optimizer_step``), then
Adam's step. Reported: the median step time of naive, of the term with ``points_per_step`` (default 64, the
callback's default) and with every point (``points_per_step=None``), as ratios to naive; and the end-of-task cost
of one kernel (``M × M`` per class, from a diagonal Laplace posterior). Timings are interleaved (naive, capped,
all, naive, ...) so that machine load hits every variant alike; the ratio is the number to read, not the times.

    python benchmarks/functional_overhead.py [--tasks 10] [--points 200] [--steps 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bayescl.gaussian import DiagGaussian
from bayescl.harness.models import MLP
from bayescl.lightning.functional import FunctionalPriorCallback
from bayescl.methods.functional import FunctionalSite, function_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--points-per-step", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MLP(hidden=(256, 256), num_classes=10)
    params = {n: p.detach() for n, p in model.named_parameters()}
    q = DiagGaussian.from_mean_precision(params, {n: 1e-4 + 100 * torch.rand_like(p) for n, p in params.items()})
    x_mem = torch.rand(args.points, 784)
    t0 = time.perf_counter()
    mean, kernel = function_kernel(model, q, (x_mem,))
    kernel_s = time.perf_counter() - t0
    sites = {f"task-{t}": FunctionalSite((torch.rand(args.points, 784),), mean, kernel) for t in range(args.tasks)}
    variants = {"capped": args.points_per_step, "all": None}
    cbs = {}
    for name, pps in variants.items():
        cb = FunctionalPriorCallback(memory_size=args.points, points_per_step=pps)
        cb.sites = dict(sites)
        cb.set_num_examples(12000)
        cbs[name] = cb
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(args.batch_size, 784), torch.randint(0, 10, (args.batch_size,))

    def step(cb: FunctionalPriorCallback | None) -> float:
        t = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if cb is not None:
            cb.add_prior_grad(model)
        opt.step()
        return time.perf_counter() - t

    for cb in (None, *cbs.values()):  # warm-up (first-call allocations, the cached factors)
        for _ in range(3):
            step(cb)
    times: dict[str, list[float]] = {"naive": [], **{k: [] for k in cbs}}
    for _ in range(args.steps):
        times["naive"].append(step(None))
        for k, cb in cbs.items():
            times[k].append(step(cb))
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    out = {"tasks": args.tasks, "points": args.points, "points_per_step": args.points_per_step,
           "batch_size": args.batch_size, "steps": args.steps, "threads": torch.get_num_threads(),
           "step_ms": med, "ratio": {k: med[k] / med["naive"] for k in cbs},
           "kernel_seconds_per_task": kernel_s}
    print(f"{args.tasks} past tasks x {args.points} points, batch {args.batch_size}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"  naive step            {med['naive']:.2f} ms")
    print(f"  + term, {args.points_per_step:>4} pts/step {med['capped']:.2f} ms  ratio {out['ratio']['capped']:.2f}")
    print(f"  + term, every point   {med['all']:.2f} ms  ratio {out['ratio']['all']:.2f}")
    print(f"  kernel of one task ({args.points} points x 10 classes): {kernel_s:.2f} s at the end of the task")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
