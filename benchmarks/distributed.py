"""PosteriorServerStrategy against Lightning's DDP on split-MNIST task-IL: accuracy, wall time, communication.

Every configuration runs as its own subprocess group (``--worker``; Lightning's ``popen`` launcher re-runs this
script for rank 1) with a timeout. Protocol: ``MultiHeadMLP`` 2x256, Adam 1e-3, batch 64 *per worker*, the same
epochs per task for every run, one new Trainer per task, pixels in [0, 1]; the first ``--limit`` training and test
examples of each task. After each task rank 0 tests the model on the test sets of all tasks (a plain loop), which
fills the accuracy matrix.

* ``ddp``: ``strategy="ddp"`` (gloo), plain fine-tuning (no continual-learning term): it all-reduces the
  gradients, ``P`` floats, at every optimizer step.
* ``posterior_server``: :class:`bayescl.lightning.strategy.PosteriorServerStrategy`, ``sync_every=K``, damping 1/W, the
  next task starts from the previous task's (task, worker) sites (``prior=previous.server``): it all-reduces
  ``2P`` floats every ``K`` steps and all-gathers ``W x 2P`` floats once per task.
* ``laplace_<structure>_<W>``: Lightning's DDP (or one process) with ``LaplaceCallback(structure=...)`` added to
  the same Trainer: DDP's gradient all-reduce at every step (``P`` floats) plus, once per task, the all-reduce of
  the curvature sums (counted by wrapping ``torch.distributed.all_reduce``: diag ``P`` floats, kron the Kronecker
  factors).

``--lam`` mode (``lam.json`` / ``lam.md``): chooses ``PosteriorServerStrategy(lam=)`` on validation data. A seeded
``--val-fraction`` (10 %) of each task's training examples (after ``--limit``) is held out; each candidate trains on
the first ``--tune-tasks`` (3) tasks for every ``--tune-seeds`` seed and is scored by its mean validation accuracy over
those tasks after the last of them (no test loader is built); the best (first on a tie) then runs over the whole
stream for every ``--seeds`` seed and is tested, beside ``--compare-lam`` (1). ``--normalize true|false`` sets
the strategy's ``normalize`` in every run (default: the strategy's own default). The run's seed seeds the model, the data
order, the validation split and the strategy's Monte Carlo labels. ``--resume`` keeps the finished runs of the file.

Usage::

    .venv/bin/python benchmarks/distributed.py [--limit 2000] [--epochs 2] [--sync-every 1 10 50]
    .venv/bin/python benchmarks/distributed.py --lam 1 10 100 1000 [--sync-every 10] [--tune-seeds 0] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------- worker
def worker(cfg: dict, result_path: Path) -> None:
    import logging

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from bayescl import ClassifierModule, MultiHeadMLP, make_stream
    from bayescl.harness.metrics import summarize
    from bayescl.lightning.laplace import LaplaceCallback
    from bayescl.lightning.strategy import PosteriorServerStrategy

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t_start = time.perf_counter()
    seed = cfg.get("seed", 0)
    # lam mode: a seeded val_fraction of each task's training examples (after limit) is held out as validation
    stream = make_stream("split-mnist-task", root=cfg["root"], limit=cfg["limit"],
                         val_fraction=cfg.get("val_fraction", 0.0), seed=seed)
    evaluate = cfg.get("evaluate", "test")  # "val": the tuning phase, which never builds a test loader
    num_train = cfg.get("train_tasks") or len(stream)  # the tuning phase trains on the first tasks only
    pl.seed_everything(seed, verbose=False)  # the data order (and Lightning's DistributedSampler seed)
    torch.manual_seed(seed)  # the model's initialisation
    model = MultiHeadMLP(hidden=(256, 256), num_tasks=len(stream))
    module = ClassifierModule(model, num_tasks=len(stream), lr=1e-3)
    n_params = sum(p.numel() for p in model.parameters())
    kind, W = cfg["kind"], cfg["workers"]
    timeout = timedelta(seconds=cfg["timeout"])
    R = torch.full((num_train, num_train), float("nan"))
    fit_seconds, steps, prev, callbacks, syncs, bytes_sync, bytes_gather = 0.0, 0, None, [], 0, 0, 0
    collective_bytes = [0]
    if kind == "laplace":
        callbacks = [LaplaceCallback(structure=cfg["structure"])]
        import torch.distributed as dist

        all_reduce = dist.all_reduce

        def counted(tensor, *args, **kwargs):  # the callbacks' collectives (DDP's own run in C++, counted below)
            collective_bytes[0] += tensor.numel() * tensor.element_size()
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counted
    rank = 0
    for i, task in enumerate(stream.tasks[:num_train]):
        if kind in ("ddp", "laplace") and W > 1:
            # the multi-head model leaves the other tasks' heads unused at every step
            strategy = DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", timeout=timeout)
        elif kind == "posterior_server":
            lam = {k: cfg[k] for k in ("lam", "normalize") if cfg.get(k) is not None}  # else the strategy's defaults
            strategy = PosteriorServerStrategy(sync_every=cfg["sync_every"], prior=prev,
                                               gather_sites=cfg.get("gather_sites", True), seed=seed, **lam,
                                               process_group_backend="gloo", timeout=timeout)
        else:
            strategy = "auto"
        trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=W, max_epochs=cfg["epochs"],
                             callbacks=callbacks, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        t0 = time.perf_counter()
        trainer.fit(module, DataLoader(task.train, batch_size=cfg["batch_size"], shuffle=True))
        fit_seconds += time.perf_counter() - t0
        steps += trainer.global_step
        rank = trainer.global_rank
        if kind == "posterior_server":
            prev = strategy.server
            syncs, bytes_sync, bytes_gather = strategy.num_syncs + syncs, bytes_sync + strategy.bytes_communicated, \
                bytes_gather + strategy.bytes_gathered
        if rank == 0:
            module.eval()
            with torch.no_grad():
                for j, t in enumerate(stream.tasks[:num_train]):
                    correct = total = 0
                    data = t.test_dataloader(batch_size=1000) if evaluate == "test" else \
                        t.val_dataloader(batch_size=1000)
                    for x, y, tid in data:
                        correct += int((module(x, tid).argmax(-1) == y).sum())
                        total += len(y)
                    R[i, j] = correct / total
            module.train()
            acc = 100 * float(R[i, :i + 1].mean())
            print(f"[{cfg['name']}] task {i + 1}: {evaluate} acc on seen {acc:.2f}", flush=True)
    if rank != 0:
        return
    if kind in ("ddp", "laplace") and W > 1:
        bytes_sync = steps * n_params * 4  # one all-reduce of every gradient per optimizer step
        bytes_gather = collective_bytes[0]  # the curvature all-reduce at the end of each task
    epochs_total = num_train * cfg["epochs"]
    prefix = "" if evaluate == "test" else "val_"  # a validation matrix is never read as a test result
    summary = {prefix + k: v for k, v in {**summarize(R), "accuracy_matrix": R.tolist()}.items()}
    res = {**cfg, **summary, "fit_seconds": fit_seconds,
           "process_seconds": time.perf_counter() - t_start, "optimizer_steps_per_worker": steps,
           "num_params": n_params, "syncs": syncs if kind == "posterior_server" else (steps if W > 1 else 0),
           "bytes_allreduce": bytes_sync, "bytes_gather": bytes_gather,
           "bytes_per_epoch": (bytes_sync + bytes_gather) / epochs_total}
    result_path.write_text(json.dumps(res, indent=1))


# ----------------------------------------------------------------------------------------------- orchestrator
def run_config(cfg: dict, out_dir: Path, timeout: float) -> dict:
    path = out_dir / f"{cfg['name']}.run.json"
    path.unlink(missing_ok=True)
    # one intra-op thread per process in every run: on 2 cores shared with other jobs, a 2-thread OpenMP pool in a
    # single-worker run spins against the load and was up to 10x slower (Lightning sets cores / processes otherwise)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg), str(path)],
                            cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wall = time.perf_counter() - t0
    if rc != 0 or not path.exists():
        return {**cfg, "error": f"exit code {rc}" if rc is not None else f"timed out after {timeout} s",
                "launch_seconds": wall, "load_avg_before": load}
    res = json.loads(path.read_text())
    path.unlink()
    res["launch_seconds"] = wall
    res["load_avg_before"] = load  # 1-minute load average of the machine when the run started (2 cores)
    return res


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Distributed training: posterior server vs DDP (split-MNIST task-IL)", "",
        f"Command: `{meta['command']}`", "",
        f"Protocol: {meta['protocol']}", "",
        f"Machine: {meta['machine']}", "",
        ("| run | workers | sync every K | avg acc (%) | BWT (%) | fit time (s) | launch+total (s) | load avg "
         "| steps/worker | syncs (all-reduces) | MB all-reduced | MB gathered / curvature | MB per epoch | vs DDP-2 per epoch |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ddp2 = next((r for r in results if r["kind"] == "ddp" and r["workers"] == 2 and "error" not in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['workers']} | {r.get('sync_every', '-')} | failed: {r['error']} "
                         "| | | | | | | | | | |")
            continue
        rel = (f"{r['bytes_per_epoch'] / ddp2['bytes_per_epoch']:.3f}"
               if ddp2 and ddp2["bytes_per_epoch"] and r["workers"] > 1 else "-")
        lines.append(
            f"| {r['name']} | {r['workers']} | {r.get('sync_every', '-') if r['kind'] == 'posterior_server' else '-'} "
            f"| {100 * r['avg_accuracy']:.2f} | {100 * r['bwt']:.2f} | {r['fit_seconds']:.1f} "
            f"| {r['launch_seconds']:.1f} | {r['load_avg_before']:.1f} | {r['optimizer_steps_per_worker']} "
            f"| {r['syncs']} "
            f"| {r['bytes_allreduce'] / 1e6:.1f} | {r['bytes_gather'] / 1e6:.1f} | {r['bytes_per_epoch'] / 1e6:.2f} "
            f"| {rel} |")
    lines += ["", *meta["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=2000, help="training and test examples kept per task")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sync-every", type=int, nargs="+", default=None,
                   help="K of the posterior_server runs (default 1 10 50; with --lam one value, default 10)")
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed"))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--only", nargs="*", help="run only these configuration names")
    g = p.add_argument_group("lam mode: choose PosteriorServerStrategy's lam on validation data (writes lam.json/.md)")
    g.add_argument("--lam", type=float, nargs="+", help="the candidate grid; switches to this mode")
    g.add_argument("--tune-tasks", type=int, default=3, help="tasks each candidate trains and is validated on")
    g.add_argument("--tune-seeds", type=int, nargs="+", default=[0])
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the whole-stream test runs")
    g.add_argument("--val-fraction", type=float, default=0.1, help="held out of each task's training examples")
    g.add_argument("--compare-lam", type=float, default=1.0,
                   help="also run this lam over the whole stream (default 1, the strategy's old default)")
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--lam-name", default="lam", help="file stem of the JSON and markdown written")
    g.add_argument("--normalize", choices=("true", "false"), default=None,
                   help="PosteriorServerStrategy(normalize=...) of every run (default: the strategy's default)")
    g.add_argument("--resume", action="store_true", help="keep the finished runs of the same file")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.lam:  # the validation tuning of the strategy's lam (distributed_lam.py, beside this script)
        from distributed_lam import run_lam

        run_lam(args, argv, run_config)
        return
    args.sync_every = args.sync_every or [1, 10, 50]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {"limit": args.limit, "epochs": args.epochs, "batch_size": args.batch_size, "root": args.root,
            "timeout": 120}
    configs = [
        *({**base, "name": f"laplace_{s}_{w}", "kind": "laplace", "structure": s, "workers": w}
          for s in ("diag", "kron") for w in (1, 2)),
        {**base, "name": "ddp_1", "kind": "ddp", "workers": 1},
        {**base, "name": "ddp_2", "kind": "ddp", "workers": 2},
        {**base, "name": "ps_1_K10", "kind": "posterior_server", "workers": 1, "sync_every": 10},
        *({**base, "name": f"ps_2_K{k}", "kind": "posterior_server", "workers": 2, "sync_every": k}
          for k in args.sync_every),
        {**base, "name": f"ps_2_K{max(args.sync_every)}_nogather", "kind": "posterior_server", "workers": 2,
         "sync_every": max(args.sync_every), "gather_sites": False},
    ]
    order = [c["name"] for c in configs]  # the table's row order, whatever was rerun
    results = []
    if args.only:  # rerun some rows: the others are kept from the results already on disk
        configs = [c for c in configs if c["name"] in args.only]
        if (out / "results.json").exists():
            results = [r for r in json.loads((out / "results.json").read_text())["results"]
                       if r["name"] not in args.only]
    command = " ".join([".venv/bin/python benchmarks/distributed.py",
                        *(shlex.quote(a) for a in (argv or sys.argv[1:]))])
    meta = {
        "command": command,
        "protocol": (f"split-MNIST task-IL, 5 tasks, first {args.limit} train and test examples per task, "
                     f"{args.epochs} epoch(s) per task, MultiHeadMLP 2x256, Adam 1e-3, batch {args.batch_size} per "
                     "worker (DDP with 2 workers: global batch 2x), gloo, one Trainer per task."),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other "
                   f"processes, torch + pytorch-lightning on {platform.python_version()}",
        "notes": [
            ("- Bytes are payloads put into collectives (a ring all-reduce moves about twice that over the wire): "
             "DDP = 4 B x P x optimizer steps (P = 269,322 parameters here); posterior server = 4 B x 2P x syncs "
             "(+ one all-gather of W x 2P floats per task, column 'MB gathered / curvature'); DDP + LaplaceCallback = "
             "DDP's gradients + the curvature all-reduce once per task (same column, counted at the collective); "
             "nothing with one worker. "
             "Per epoch = total / (tasks x epochs)."),
            ("- A worker runs 16 optimizer steps per epoch (1000 examples per worker, batch 64), 32 per task: with "
             "K = 50 the only sync of a task is the one that closes its fit (one round per task)."),
            ("- `ddp_*` is plain fine-tuning (no continual-learning term), so its accuracy shows forgetting; "
             "`laplace_*` add `LaplaceCallback(structure=...)` (defaults otherwise) to the same Trainer, with 1 or 2 "
             "processes."),
            ("- `ps_*` keep one site per (task, worker) (`gather_sites=True`, the default); `*_nogather` keeps one "
             "site per task (`gather_sites=False`): no end-of-task all-gather."),
            ("- Wall times are indicative only: 2 CPU cores shared with other sessions' jobs (column 'load avg', "
             "the 1-minute load average when the run started). With 2 workers on 2 shared cores there is no "
             "parallel speed-up to expect; where a 2-worker run looks faster than a 1-worker one, the difference "
             "is the load at the time, not the method. 'launch+total' includes process start-up and data loading. "
             "Every process runs with OMP_NUM_THREADS=1 (one intra-op thread)."),
        ],
    }
    for cfg in configs:
        print(f"== {cfg['name']}", flush=True)
        r = run_config(cfg, out, args.timeout)
        results = sorted([x for x in results if x["name"] != cfg["name"]] + [r],
                         key=lambda x: order.index(x["name"]) if x["name"] in order else len(order))
        msg = r.get("error") or f"avg acc {100 * r['avg_accuracy']:.2f}, fit {r['fit_seconds']:.1f} s"
        print(f"   -> {msg}", flush=True)
        (out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=1))
        (out / "results.md").write_text(to_markdown(results, meta))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
