"""Speed and memory of the posterior machinery on CPU, as ratios to plain training.

(a) prior gradient ``Λθ − η`` per optimizer step (``quadratic_grad``) of a ``DiagGaussian`` and of a
    ``KronGaussian`` holding T = 1, 5, 20 summed Kronecker terms per layer (and the same merged into one pair),
    divided by one plain Adam step (forward, backward, step) at batch 64 of the same model;
(b) one curvature pass per task (``diag_fisher`` mc / empirical / exact, ``kfac`` mc / exact) over a synthetic
    MNIST-shaped task, divided by one training epoch over the same data at the same batch size;
(c) floats kept after T tasks: diagonal, exact sum of Kronecker terms, merged pair.

Models: ``MultiHeadMLP`` 2x256 (784 inputs, 5 two-way heads) and ``SmallCNN``. Timings are medians; the machine
may be shared, so every time is the CPU time of this process (``time.process_time``, all its threads), not wall
time, and curvature ratios are taken within the same repetition. Usage::

    .venv/bin/python benchmarks/posterior_speed.py [--quick] [--out benchmarks/results/posterior_speed]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescl._params import linear_layers
from bayescl.curvature import diag_fisher, kfac
from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kron import KronGaussian
from bayescl.harness.models import MultiHeadMLP, SmallCNN

TASKS = (1, 5, 20)
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MultiHeadMLP(784, (256, 256), num_tasks=5, classes_per_task=2) if name == "mlp" else SmallCNN()


def make_data(name: str, n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 784, generator=g)
    if name == "mlp":
        return TensorDataset(x, torch.randint(0, 2, (n,), generator=g), torch.zeros(n, dtype=torch.long))
    return TensorDataset(x, torch.randint(0, 10, (n,), generator=g))


CLOCK = time.process_time  # CPU time of this process: robust to other processes on a shared machine


def median_ms(fn, calls: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(calls):
        t = CLOCK()
        fn()
        ts.append(CLOCK() - t)
    return 1e3 * statistics.median(ts)


def adam_step_fn(model: nn.Module, batch):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y, *t = batch

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x, *t), y).backward()
        opt.step()

    return step


def train_epoch(model: nn.Module, loader: DataLoader) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = CLOCK()
    for x, y, *t in loader:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x, *t), y).backward()
        opt.step()
    return CLOCK() - t0


#: rank of the low-rank factors timed beside the full ones (``KronGaussian.low_rank``)
RANK = 32


def random_site(model: nn.Module, seed: int) -> KronGaussian:
    """A Kronecker site with random PSD factors (timing does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    layers = linear_layers(model)
    named = dict(model.named_parameters())
    factors = {}
    for layer, (w, b) in layers.items():
        p = named[w][0].numel() + (b is not None)
        o = named[w].shape[0]
        xa, xg = torch.randn(p, p, generator=g), torch.randn(o, o, generator=g)
        factors[layer] = (xa @ xa.T / p, xg @ xg.T / o)
    covered = {n for pair in layers.values() for n in pair if n is not None}
    mean = {n: t.detach() + 0.01 * torch.randn(t.shape, generator=g) for n, t in named.items()}
    diag = {n: torch.rand(t.shape, generator=g) for n, t in named.items() if n not in covered}
    return KronGaussian.from_factors(mean, factors, layers, diag)


def bench_prior(name: str, calls: int) -> dict:
    model = make_model(name)
    batch = make_data(name, 64, seed=1).tensors
    step = adam_step_fn(model, batch)
    out: dict = {"adam_step_ms": median_ms(step, calls)}
    g = torch.Generator().manual_seed(0)
    named = {n: p.detach() for n, p in model.named_parameters()}
    diag = DiagGaussian.from_mean_precision(named, {n: torch.rand(t.shape, generator=g) for n, t in named.items()})
    out["diag_ms"] = median_ms(lambda: diag.quadratic_grad(model), calls)
    prior = KronGaussian.isotropic(model, 1.0)
    post, floats = prior, {}
    for t in range(1, max(TASKS) + 1):
        post = post * random_site(model, t)
        if t in TASKS:
            merged = post.merge()
            merged.quadratic_grad(model)
            log(f"{name}: prior gradient with T={t}")
            out[f"kron_T{t}_ms"] = median_ms(lambda p=post: p.quadratic_grad(model), calls)
            out[f"kron_T{t}_merged_ms"] = median_ms(lambda p=merged: p.quadratic_grad(model), calls)
            low = merged.low_rank(RANK)
            out[f"kron_T{t}_merged_r{RANK}_ms"] = median_ms(lambda p=low: p.quadratic_grad(model), calls)
            floats[f"T{t}"] = {"diag": diag.num_floats(), "kron_sum": post.num_floats(), "kron_merged": merged.num_floats()}
    out["ratios"] = {k[:-3]: v / out["adam_step_ms"] for k, v in out.items() if k.endswith("_ms") and k != "adam_step_ms"}
    out["num_params"] = sum(t.numel() for t in named.values())
    return {"prior": out, "floats": floats}


CURV = {
    "diag_mc": lambda m, dl: diag_fisher(m, dl, fisher="mc"),
    "diag_empirical": lambda m, dl: diag_fisher(m, dl, fisher="empirical"),
    "diag_exact": lambda m, dl: diag_fisher(m, dl, fisher="exact"),
    "kfac_mc": lambda m, dl: kfac(m, dl, fisher="mc"),
    "kfac_exact": lambda m, dl: kfac(m, dl, fisher="exact"),
}


def bench_curvature(name: str, n: int, batch_size: int, reps: int) -> dict:
    model = make_model(name)
    loader = DataLoader(make_data(name, n, seed=2), batch_size=batch_size, shuffle=False)
    rows: dict[str, list[float]] = {"epoch_s": [], **{k: [] for k in CURV}}
    ratios: dict[str, list[float]] = {k: [] for k in CURV}
    for _ in range(reps):  # interleaved, ratio within a repetition (the machine may be shared)
        ep = train_epoch(model, loader)
        rows["epoch_s"].append(ep)
        for k, fn in CURV.items():
            log(f"{name}: curvature {k}")
            t0 = CLOCK()
            fn(model, loader)
            dt = CLOCK() - t0
            rows[k].append(dt)
            ratios[k].append(dt / ep)
    return {
        "examples": n,
        "batch_size": batch_size,
        "seconds": {k: statistics.median(v) for k, v in rows.items()},
        "ratio_to_epoch": {k: statistics.median(v) for k, v in ratios.items()},
    }


def to_markdown(res: dict) -> str:
    lines = [
        "# Posterior speed and memory (CPU)",
        "",
        f"Command: `{res['command']}`  ",
        (f"torch {res['torch']}, {res['threads']} threads, {res['platform']}; times are process CPU time "
         "(time.process_time, all threads), medians"),
        "",
        "## (a) prior gradient per optimizer step, ratio to one Adam step at batch 64",
        "",
        f"| model | Adam step (ms) | diag | kron T=1 | T=5 | T=20 | merged T=5 | merged T=20 | merged rank {RANK} T=20 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in res["models"].items():
        p, q = r["prior"], r["prior"]["ratios"]
        lines.append(
            f"| {m} | {p['adam_step_ms']:.2f} | {q['diag']:.3f} | {q['kron_T1']:.2f} | {q['kron_T5']:.2f} | "
            f"{q['kron_T20']:.2f} | {q['kron_T5_merged']:.2f} | {q['kron_T20_merged']:.2f} | "
            f"{q[f'kron_T20_merged_r{RANK}']:.2f} |"
        )
    lines += ["", "## (b) curvature pass per task, ratio to one training epoch (seconds in brackets)", ""]
    keys = list(CURV)
    lines += ["| model | examples / batch | epoch (s) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
    for m, r in res["models"].items():
        c = r["curvature"]
        cells = " | ".join(f"{c['ratio_to_epoch'][k]:.2f} ({c['seconds'][k]:.2f})" for k in keys)
        lines.append(f"| {m} | {c['examples']} / {c['batch_size']} | {c['seconds']['epoch_s']:.2f} | {cells} |")
    lines += ["", "## (c) floats kept after T tasks", "", "| model | T | diag | kron exact sum | kron merged |",
              "|---|---|---|---|---|"]
    for m, r in res["models"].items():
        for t, f in r["floats"].items():
            lines.append(f"| {m} | {t[1:]} | {f['diag']:,} | {f['kron_sum']:,} | {f['kron_merged']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls and one repetition")
    ap.add_argument("--examples", type=int, default=12000, help="examples in the curvature task")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size of the epoch and the curvature pass")
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    ap.add_argument("--out", default="benchmarks/results/posterior_speed")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default); 1 is robust on an oversubscribed machine")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    calls, reps = (50, 1) if args.quick else (200, 3)
    res = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "quick": args.quick,
        "models": {},
    }
    for m in args.models:
        r = bench_prior(m, calls)
        r["curvature"] = bench_curvature(m, args.examples, args.batch_size, reps)
        res["models"]["MultiHeadMLP 2x256" if m == "mlp" else "SmallCNN"] = r
        print(m, json.dumps(r["prior"]["ratios"]), json.dumps(r["curvature"]["ratio_to_epoch"]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
