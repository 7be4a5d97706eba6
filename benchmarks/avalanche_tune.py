"""Avalanche's EWC and SI, and our plugins' defaults, with their λ chosen on validation data, not on test accuracy.

Families: ``ewc``, ``ewc-online``, ``si`` (Avalanche's own), ``laplace`` (``LaplaceCallback()`` in ``LaplacePlugin``,
λ is its ``lam``) and ``vcl`` (``VCLCallback()`` in ``VCLPlugin``, λ is ``r`` of ``logvar_init="fan_in:r"``).

``benchmarks/avalanche_compare.py`` sweeps the baselines' λ and reports every row on the test stream, so the best row
is a test-chosen number. This script holds out a seeded ``--val-fraction`` (10 %) of every training experience
(Avalanche's ``split_validation_random``, seeded by the run's seed), trains each λ of ``--lambdas`` on the
rest with every ``--tune-seeds`` seed and scores it by the mean accuracy over all 5 validation experiences after the
last one (no test experience is evaluated). The best λ (the first on a tie) then runs with ``--seeds`` seeds, trained
on the same 90 % and tested on the test stream. Model, optimizer and data are ``avalanche_compare.py``'s
(``--setting``, Adam 1e-3, batch 64, 5 epochs per experience). Writes ``<out>/<scenario>-<family>.json`` and ``.md``
after every finished run; ``--resume`` keeps the finished candidates of a file written under the same protocol.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/avalanche_tune.py --family ewc --setting domain \\
        --lambdas 1000 10000 100000 1000000 --tune-seeds 0 1 2 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from copy import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from avalanche.benchmarks.classic import SplitMNIST
from avalanche.benchmarks.scenarios.validation_scenario import split_validation_random

sys.path.insert(0, str(Path(__file__).resolve().parent))
from avalanche_compare import PROTOCOL, ROOT, SETTINGS, add_protocol_arguments, fix_si_on_cpu, run_one

from bayescl.harness.metrics import mean_std

#: family -> λ -> the run's spec (``avalanche_compare.run_one``): Avalanche's EWC / SI, or Avalanche's Naive with our
#: ``LaplacePlugin`` carrying ``LaplaceCallback()`` at that ``lam``, or ``VCLPlugin`` carrying ``VCLCallback()`` with
#: ``logvar_init="fan_in:<λ>"`` (their defaults otherwise; for ``vcl`` the "λ" is that fan-in ratio).
FAMILIES = {
    "ewc": lambda lam: {"class_path": "avalanche.training.EWC",
                        "init_args": {"ewc_lambda": lam, "mode": "separate"}},
    "ewc-online": lambda lam: {"class_path": "avalanche.training.EWC",
                               "init_args": {"ewc_lambda": lam, "mode": "online", "decay_factor": 0.9}},
    "si": lambda lam: {"class_path": "avalanche.training.SynapticIntelligence", "init_args": {"si_lambda": lam}},
    "laplace": lambda lam: {"class_path": "avalanche.training.Naive", "init_args": {},
                            "bayescl_recipe": "laplace-default", "bayescl_init_args": {"lam": lam}},
    "vcl": lambda r: {"class_path": "avalanche.training.Naive", "init_args": {},
                      "bayescl_recipe": "vcl-default", "bayescl_init_args": {"logvar_init": f"fan_in:{r:g}"}},
}
#: what the grid's values are, per family (the tables' first column)
KNOB = {"laplace": "`lam`", "vcl": "r of `logvar_init=\"fan_in:r\"`"}
WHO = {"laplace": "LaplaceCallback() through LaplacePlugin in Avalanche's Naive",
       "vcl": "VCLCallback() through VCLPlugin in Avalanche's Naive"}


def split_streams(train_stream, val_fraction: float, seed: int) -> tuple[list, list]:
    """``(train, valid)``: copies of every training experience holding a seeded shuffled split of its data
    (``split_validation_random``; ``val_fraction`` to ``valid``), with their task labels, classes and indices
    (Avalanche 0.6's ``benchmark_with_validation_stream`` drops those, and multi-head models need them)."""
    train, valid = [], []
    for exp in train_stream:
        for part, stream in zip(split_validation_random(val_fraction, True, seed, exp.dataset), (train, valid)):
            stream.append(copy(exp))
            stream[-1].dataset = part
    return train, valid


def split_benchmark(setting: str, root: str, val_fraction: float, seed: int) -> SimpleNamespace:
    """Avalanche's SplitMNIST of ``setting`` with ``train_stream`` / ``valid_stream`` from :func:`split_streams`
    and the test stream unchanged."""
    bm = SplitMNIST(5, fixed_class_order=list(range(10)), train_transform=None, eval_transform=None,
                    dataset_root=root, **SETTINGS[setting][0])
    train, valid = split_streams(bm.train_stream, val_fraction, seed)
    return SimpleNamespace(train_stream=train, valid_stream=valid, test_stream=bm.test_stream)


def markdown(doc: dict[str, Any]) -> str:
    knob = KNOB.get(doc["family"], "λ")
    who = WHO.get(doc["family"], f"Avalanche {doc['family']}")
    lines = [f"# {who} on {doc['scenario']}: {knob} chosen on validation data", "", "Commands:", "",
             *[f"    {c}" for c in doc["commands"]], "", f"Protocol: {doc['protocol']}", "",
             f"| {knob} | validation score (%) | per tune seed (%) |", "|---|---|---|"]
    for c in doc["candidates"]:
        mark = " **(chosen)**" if c["lam"] == doc.get("chosen") else ""
        lines.append(f"| {c['lam']:g}{mark} | {100 * c['val_score']:.2f} | "
                     + ", ".join(f"{100 * r['avg_accuracy']:.2f}" for r in c["runs"]) + " |")
    if doc.get("final"):
        f = doc["final"]
        n = len(f["per_seed"])
        pm = lambda d: f"{100 * d['mean']:.2f}" + (f" ± {100 * d['std']:.2f}" if n > 1 else "")
        lines += ["", f"Test, {knob} = {doc['chosen']:g}, {n} seed(s): average accuracy {pm(f['avg_accuracy'])} %, "
                  f"BWT {pm(f['bwt'])} (per seed: "
                  + ", ".join(f"{100 * r['avg_accuracy']:.2f}" for r in f["per_seed"]) + ")."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), required=True)
    p.add_argument("--lambdas", type=float, nargs="+", required=True, help="the candidate grid")
    add_protocol_arguments(p)
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 … n-1 of the tested run of the choice")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "avalanche-validated"))
    p.add_argument("--resume", action="store_true", help="keep the finished candidates of the same protocol")
    args = p.parse_args(argv)
    if not 0.0 < args.val_fraction < 1.0:
        p.error(f"--val-fraction={args.val_fraction} must lie in (0, 1).")
    if min(args.lambdas) <= 0 or args.seeds < 1:
        p.error(f"--lambdas must be > 0 and --seeds >= 1; got {args.lambdas} and {args.seeds}.")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.fix_si:
        fix_si_on_cpu()
    args.reset_optimizer = False  # run_one's option: Avalanche's own optimizer handling, as avalanche_compare.py
    scenario = f"split-mnist-{args.setting}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{scenario}-{args.family}"
    doc: dict[str, Any] = {
        "scenario": scenario, "family": args.family, "config": vars(args),
        "commands": ["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/avalanche_tune.py "
                     + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))],
        "protocol": (f"Avalanche SplitMNIST(5, classes 0/1..8/9, {PROTOCOL[args.setting]}), pixels in [0, 1], "
                     f"{args.val_fraction:.0%} of every training experience held out as validation (Avalanche's "
                     "split_validation_random, shuffled, seeded by the run's seed; not trained on, in "
                     f"tuning and test runs alike); Adam lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs "
                     "per experience, Avalanche's optimizer handling. Each λ trains with every tune seed and is "
                     "scored by its mean validation accuracy over all 5 experiences after the last one; the best "
                     "(first on a tie) is then tested. No test experience is evaluated while tuning."),
        "candidates": [], "chosen": None, "final": None,
    }

    def save() -> None:
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
        stem.with_suffix(".md").write_text(markdown(doc))

    same = ("setting", "tune_seeds", "val_fraction", "epochs", "batch_size", "lr", "fix_si")
    old = json.loads(stem.with_suffix(".json").read_text()) if args.resume and stem.with_suffix(".json").exists() \
        else None
    resumed = old is not None and all(old["config"].get(k) == doc["config"][k] for k in same)
    if resumed:
        doc["commands"] = old["commands"] + doc["commands"]
    kept = {c["lam"]: c for c in old["candidates"]} if resumed else {}
    for lam in args.lambdas:
        if lam in kept:
            doc["candidates"].append(kept[lam])
            print(f"{args.family} lam={lam:g}: kept (validation {100 * kept[lam]['val_score']:.2f})", flush=True)
            continue
        spec = {"name": f"{args.family} lam={lam:g}", **FAMILIES[args.family](lam)}
        runs = [run_one(spec, split_benchmark(args.setting, args.root, args.val_fraction, s), s, args, "valid")
                for s in args.tune_seeds]
        doc["candidates"].append({"lam": lam, "val_score": sum(r["avg_accuracy"] for r in runs) / len(runs),
                                  "runs": runs})
        print(f"{spec['name']}: validation {100 * doc['candidates'][-1]['val_score']:.2f}", flush=True)
        save()
    best = max(doc["candidates"], key=lambda c: c["val_score"])  # max keeps the first on a tie
    doc["chosen"] = best["lam"]
    spec = {"name": f"{args.family} lam={best['lam']:g}", **FAMILIES[args.family](best["lam"])}
    per_seed = [run_one(spec, split_benchmark(args.setting, args.root, args.val_fraction, s), s, args, "test")
                for s in range(args.seeds)]
    doc["final"] = {"per_seed": per_seed, **{k: mean_std([r[k] for r in per_seed])
                                            for k in ("avg_accuracy", "bwt", "forgetting", "wall_seconds")}}
    save()
    print(markdown(doc))


if __name__ == "__main__":
    main()
