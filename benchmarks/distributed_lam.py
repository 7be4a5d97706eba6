"""``benchmarks/distributed.py --lam``: choose ``PosteriorServerStrategy(lam=)`` on validation data.

Each candidate trains on the first ``--tune-tasks`` tasks of split-MNIST task-IL with ``--tune-seeds`` seeds (10 % of
each task's training examples held out, no test loader) and is scored by its mean validation accuracy; the best one
(and ``--compare-lam``) then runs over the whole stream with ``--seeds`` seeds and is tested. The runs themselves are
``distributed.py``'s workers; this module holds the protocol, the choice and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
from collections.abc import Callable
from pathlib import Path


def _mean_std(values: list[float]) -> dict:
    """:func:`~bayescl.harness.metrics.mean_std` with the values kept (the report prints one value without a ±)."""
    from bayescl.harness.metrics import mean_std

    return {**mean_std(values), "values": values}


def _pm(stat: dict, scale: float = 100.0) -> str:
    if len(stat["values"]) == 1:  # a std of one value is no information
        return f"{scale * stat['mean']:.2f}"
    return f"{scale * stat['mean']:.2f} ± {scale * stat['std']:.2f}"


def lam_markdown(doc: dict) -> str:
    tune, lines = doc["tune"], []
    lines += [(f"# PosteriorServerStrategy's `lam`, chosen on validation data (split-MNIST task-IL, "
               f"{doc['workers']} gloo processes)"), "",
              "Commands:", "", *(f"    {c}" for c in doc["commands"]), "",
              f"Protocol: {doc['protocol']}", "", f"Machine: {doc['machine']}", "",
              f"## Tuning: validation only (first {tune['tune_tasks']} tasks, seeds {tune['tune_seeds']})", "",
              ("Score: mean validation accuracy over the first tasks after training the last of them (averaged "
               "over the tune seeds); no test data is read. The highest score is chosen (the first in grid order on "
               "a tie)."),
              "", "| lam | validation score (%) | per seed (%) | BWT on validation (%) | fit s |",
              "|---|---|---|---|---|"]
    for c in tune["candidates"]:
        if c.get("error"):
            lines.append(f"| {c['lam']:g} | failed: {c['error']} | | | |")
            continue
        mark = " **(chosen)**" if tune.get("chosen_lam") == c["lam"] else ""
        lines.append(f"| {c['lam']:g}{mark} | {100 * c['val_score']:.2f} "
                     f"| {', '.join(f'{100 * v:.2f}' for v in c['val_scores'])} | {_pm(c['val_bwt'])} "
                     f"| {c['fit_seconds']:.1f} |")
    lines += ["", f"Chosen: lam = {tune['chosen_lam']:g}" if tune.get("chosen_lam") is not None else
              "Chosen: (tuning not finished)", "",
              f"## Whole stream ({doc['num_tasks']} tasks), tested on the test sets, seeds {doc['seeds']}", "",
              "| lam | role | avg acc (%) | BWT (%) | forgetting (%) | avg acc per seed (%) | fit s per seed |",
              "|---|---|---|---|---|---|---|"]
    for f in doc["final"]:
        done = [r for r in f["runs"] if "error" not in r]
        errors = [f"seed {r['seed']}: {r['error']}" for r in f["runs"] if "error" in r]
        if not done:
            lines.append(f"| {f['lam']:g} | {f['role']} | failed: {'; '.join(errors)} | | | | |")
            continue
        per_seed = ", ".join(f"{100 * r['avg_accuracy']:.2f} (s{r['seed']})" for r in done)
        fit = ", ".join(f"{r['fit_seconds']:.1f}" for r in done)
        failed = f" failed: {'; '.join(errors)}" if errors else ""
        lines.append(f"| {f['lam']:g} | {f['role']} | {_pm(f['avg_accuracy'])} | {_pm(f['bwt'])} "
                     f"| {_pm(f['forgetting'])} | {per_seed} | {fit} |{failed}")
    lines += ["", *doc["notes"]]
    return "\n".join(lines) + "\n"


def run_lam(args: argparse.Namespace, argv: list[str], run_config: Callable[[dict, Path, float], dict]) -> None:
    """Choose ``PosteriorServerStrategy(lam=)`` on validation data, then run the choice (and ``--compare-lam``)
    over the whole stream and test it; writes ``lam.json`` and ``lam.md`` after every finished run. ``run_config``
    runs one configuration as its own process group (``distributed.run_config``)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    K = args.sync_every[0] if args.sync_every else 10
    if args.sync_every and len(args.sync_every) > 1:
        raise SystemExit("--lam takes one --sync-every value")
    json_path, md_path = out / f"{args.lam_name}.json", out / f"{args.lam_name}.md"
    base = {"kind": "posterior_server", "workers": args.workers, "sync_every": K, "limit": args.limit,
            "epochs": args.epochs, "batch_size": args.batch_size, "root": args.root, "timeout": 120,
            "val_fraction": args.val_fraction}
    strategy_args = f"sync_every={K}, lam=<candidate>"
    if args.normalize is not None:  # else the strategy's default, and the protocol does not name it
        base["normalize"] = args.normalize == "true"
        strategy_args += f", normalize={base['normalize']}"
    command = " ".join(["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed.py",
                        *(shlex.quote(a) for a in argv)])
    old = json.loads(json_path.read_text()) if args.resume and json_path.exists() else None
    finished = {}  # (phase, lam, seed) -> a finished run of the same configuration, kept by --resume
    if old is not None:
        for r in [*(r for c in old["tune"]["candidates"] for r in c.get("runs", [])),
                  *(r for f in old["final"] for r in f["runs"])]:
            if "error" not in r and all(r.get(k) == v for k, v in base.items()):  # the same protocol
                finished[(r["evaluate"], r["lam"], r["seed"])] = r
    doc = {
        "commands": [*(old["commands"] if old else []), command],
        "workers": args.workers, "num_tasks": 5, "seeds": args.seeds,
        "protocol": (f"split-MNIST task-IL, 5 tasks, first {args.limit} train and test examples per task, of which "
                     f"a seeded {args.val_fraction:.0%} of the training examples (seeded by the run's seed) is held "
                     f"out as validation (not trained on, in tuning and final runs alike); {args.epochs} epoch(s) per "
                     f"task, MultiHeadMLP 2x256, Adam 1e-3, batch {args.batch_size} per worker, "
                     f"PosteriorServerStrategy({strategy_args}, seed=<run seed>), other arguments at "
                     f"their defaults, {args.workers} gloo CPU processes, one Trainer per task, the next task's prior "
                     "= the previous server. The run's seed seeds the model initialisation, the data order "
                     "(pl.seed_everything, hence DistributedSampler), the validation split and the strategy's MC "
                     "labels."),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores shared with other "
                   f"processes, torch + pytorch-lightning on {platform.python_version()}",
        "tune": {"protocol": (f"each candidate trains on the first {args.tune_tasks} tasks (seeds "
                              f"{args.tune_seeds}) and is scored by its validation average accuracy over those tasks "
                              "after the last of them, averaged over the seeds; highest score wins, first in grid "
                              "order on a tie; no test loader is built"),
                 "grid": args.lam, "tune_tasks": args.tune_tasks, "tune_seeds": args.tune_seeds,
                 "val_fraction": args.val_fraction, "candidates": [], "chosen_lam": None},
        "final": [],
        "notes": [
            ("- Every run trains on 90 % of the first `limit` training examples of a task (the validation part is "
             "held out in the final runs too), so its numbers are not those of results.md, which trains on all of "
             "them and seeds everything with 0."),
            ("- avg acc: mean test accuracy over the 5 tasks after the last one; BWT: backward transfer; "
             "mean ± std (sample std) over seeds."),
            ("- Wall times are indicative only: 2 CPU cores shared with other jobs, every process with "
             "OMP_NUM_THREADS=1."),
        ],
    }

    def save() -> None:
        json_path.write_text(json.dumps(doc, indent=1))
        md_path.write_text(lam_markdown(doc))

    def one(lam: float, seed: int, evaluate: str) -> dict:
        key = (evaluate, lam, seed)
        if key in finished:
            print(f"== kept {evaluate} lam={lam:g} seed={seed} from {json_path.name}", flush=True)
            return finished[key]
        name = f"{'tune' if evaluate == 'val' else 'final'}_lam{lam:g}_s{seed}"
        cfg = {**base, "name": name, "lam": lam, "seed": seed, "evaluate": evaluate,
               "train_tasks": args.tune_tasks if evaluate == "val" else None}
        print(f"== {name}", flush=True)
        r = run_config(cfg, out, args.timeout)
        if "error" in r:
            print(f"   -> {r['error']}", flush=True)
        else:
            acc = r["val_avg_accuracy" if evaluate == "val" else "avg_accuracy"]
            print(f"   -> {evaluate} avg acc {100 * acc:.2f}, fit {r['fit_seconds']:.1f} s", flush=True)
        return r

    for lam in args.lam:  # tuning: validation only
        cand = {"lam": lam, "runs": []}
        doc["tune"]["candidates"].append(cand)
        for seed in args.tune_seeds:
            cand["runs"].append(one(lam, seed, "val"))
            ok = [r for r in cand["runs"] if "error" not in r]
            errors = [r["error"] for r in cand["runs"] if "error" in r]
            cand.update({"val_scores": [r["val_avg_accuracy"] for r in ok],
                         "val_score": _mean_std([r["val_avg_accuracy"] for r in ok])["mean"] if ok else None,
                         "val_bwt": _mean_std([r["val_bwt"] for r in ok]) if ok else None,
                         "fit_seconds": sum(r["fit_seconds"] for r in ok) / max(1, len(ok)),
                         **({"error": "; ".join(errors)} if errors else {})})
            if not errors:
                cand.pop("error", None)
            save()
    scored = [c for c in doc["tune"]["candidates"] if "error" not in c]
    if not scored:
        raise SystemExit("every tuning candidate failed")
    chosen = max(scored, key=lambda c: c["val_score"])["lam"]  # max keeps the first on a tie
    doc["tune"]["chosen_lam"] = chosen
    save()
    finals = [(chosen, "chosen on validation")]
    if args.compare_lam is not None and args.compare_lam != chosen:
        finals.append((args.compare_lam, "comparison (--compare-lam)"))
    for lam, role in finals:  # the whole stream, tested
        f = {"lam": lam, "role": role, "runs": []}
        doc["final"].append(f)
        for seed in args.seeds:
            f["runs"].append(one(lam, seed, "test"))
            ok = [r for r in f["runs"] if "error" not in r]
            for k in ("avg_accuracy", "bwt", "forgetting"):
                f[k] = _mean_std([r[k] for r in ok]) if ok else None
            save()


