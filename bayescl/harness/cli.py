"""The ``bayescl`` command: ``bench``, ``tune``, ``data`` and ``report`` subcommands.

This module imports nothing heavy at import time (``bayescl --help`` answers without loading torch); each
subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from bayescl.harness.recipes import available_recipes
from bayescl.harness.scenarios import Scenario

#: libraries whose UserWarnings ``bayescl bench`` hides (their deprecations are hidden whatever their source)
_NOISY = r"(pytorch_lightning|lightning|lightning_fabric|torch|torchvision|torchmetrics|avalanche|curvlinops|" \
         r"linear_operator)(\.|$)"


#: ``bayescl.harness.bench.MODELS``, spelt out so that ``--help`` does not import torch (a test keeps them equal)
_MODELS = ("mlp", "cnn", "cnn-bn")


def _quiet_libraries() -> None:
    """Keep library deprecations and Lightning's advice out of ``bayescl bench``'s output (bayescl's own stay)."""
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=_NOISY)


def _add_run_args(p: argparse.ArgumentParser, out: str) -> None:
    """The arguments ``bench`` and ``tune`` share: the scenario, the protocol and where results go."""
    p.add_argument("--scenario", required=True,
                   help=f"one of: {', '.join(s.value for s in Scenario)}; or avalanche:SplitMNIST (etc.)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (default: %(default)s)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per task (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate of Adam (or of the optimizer a recipe names under module:) "
                        "(default: %(default)s)")
    p.add_argument("--model", default="mlp", choices=_MODELS,
                   help="mlp: the protocol's MLP; cnn: a small CNN; cnn-bn: the small CNN with BatchNorm after each "
                        "conv layer; all with one head per task in task-IL scenarios (default: %(default)s)")
    p.add_argument("--num-tasks", type=int, default=None, help="tasks in the stream (default: the scenario's)")
    p.add_argument("--limit", type=int, default=None,
                   help="examples per task and split, for quick runs (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of each task's training data held out for validation, seeded by the run's seed; "
                        "0: none (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="data root (default: $BAYESCL_DATA, else ./data)")
    p.add_argument("--out", default=out, help="results folder (default: %(default)s)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="Lightning progress bars (default: on in a terminal)")
    p.add_argument("--uncertainty", action=argparse.BooleanOptionalAction, default=True,
                   help="predictive uncertainty and calibration per task after each task (default: on)")
    p.add_argument("--no-report", action="store_true", help="do not rewrite the scenario's table and plots")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    recipes = ", ".join(available_recipes()) or "(none found)"
    p = sub.add_parser(
        "bench", help="run recipes over a continual-learning scenario and write results",
        description="Run each recipe over a scenario (one Lightning fit per task, every task tested after each), "
                    "write <out>/<scenario>/<recipe>.json and rewrite the scenario's table and plots.",
        epilog=f"recipes: {recipes}. A grid variant is GRID.yaml#NAME (e.g. benchmarks/grids/vcl.yaml#vcl-lv7).",
    )
    p.add_argument("--strategy", nargs="+", required=True, metavar="RECIPE",
                   help=f"recipe name(s) ({recipes}), .yaml path(s) or GRID.yaml#VARIANT")
    _add_run_args(p, "benchmarks/results")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run: keep its finished seeds and continue a seed after its last tested "
                        "task (progress is kept under <out>/<scenario>/_resume/ while a seed runs)")


def _add_tune(sub: argparse._SubParsersAction) -> None:
    recipes = ", ".join(available_recipes()) or "(none found)"
    p = sub.add_parser(
        "tune", help="choose a recipe's hyperparameters on validation data, then run the whole stream",
        description="Protocol (after Chaudhry et al. 2019): every candidate of the grid is trained on the first "
                    "--tune-tasks tasks and scored by its average validation accuracy over them (no test data is "
                    "read); the best one is run over the whole stream for --seeds seeds and tested. Writes "
                    "<out>/<scenario>/<name>.json (bench's schema plus the protocol, the grid, every candidate's "
                    "validation score and the choice); candidates go to <out>/_tune/<name>/ as they finish.",
        epilog=f"recipes: {recipes}. Example: bayescl tune --scenario split-mnist-task --strategy laplace-kron "
               "--grid lam=1,10,100,1000 --epochs 1",
    )
    p.add_argument("--strategy", default=None, metavar="RECIPE",
                   help=f"the base recipe ({recipes}, a .yaml path or GRID.yaml#VARIANT) that --grid lists change")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values of one init argument of the recipe's first callback (repeat for a cartesian "
                        "product), e.g. lam=1,10,100,1000; lr=V1,... lists the run's learning rates instead "
                        "(also beside --grid-file)")
    p.add_argument("--grid-file", default=None, metavar="GRID.yaml",
                   help="a grid file whose variants are the candidates (instead of --strategy and --grid lists)")
    p.add_argument("--tune-tasks", type=int, default=3,
                   help="the first tasks that tuning trains and validates on (default: %(default)s)")
    p.add_argument("--tune-seeds", type=int, default=1,
                   help="seeds per candidate while tuning, from --first-seed (default: %(default)s)")
    p.add_argument("--tune-epochs", type=int, default=None,
                   help="epochs per task while tuning (default: --epochs)")
    p.add_argument("--name", default=None,
                   help="the result's name (default: the recipe's name, or the grid file's stem)")
    p.add_argument("--min-learned", type=float, default=None, metavar="P",
                   help="choose only among candidates that learn every task to at least this validation accuracy "
                        "right after training it (e.g. 0.95; default: no requirement)")
    _add_run_args(p, "benchmarks/results/tuned")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped tuning: keep the candidates and seeds that finished (same arguments) and "
                        "continue a stopped one after its last evaluated task")
    p.add_argument("--no-final", action="store_true",
                   help="score the candidates and print the choice, without the final run (no test data is read): "
                        "for a grid that may not beat another grid's choice")


def _bench_config(args: argparse.Namespace, strategy: str) -> Any:
    from bayescl.harness.bench import BenchConfig

    return BenchConfig(
        scenario=args.scenario, strategy=strategy, seeds=args.seeds, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, model=args.model, num_tasks=args.num_tasks, limit=args.limit,
        root=args.data_root, first_seed=args.first_seed, progress=args.progress,
        uncertainty=args.uncertainty, resume=args.resume, val_fraction=args.val_fraction,
    )


def _print_table(args: argparse.Namespace) -> None:
    from bayescl.harness.report import load_results, markdown_table, write_report

    scenario_dir = Path(args.out) / args.scenario.replace(":", "-")
    print()
    print(markdown_table(load_results(scenario_dir)))
    if not args.no_report:
        written = write_report(args.out)
        print("\nwrote " + ", ".join(str(p) for p in written if p.parent == scenario_dir))


def _bench(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from bayescl.harness.bench import check_runnable, run_benchmark
    from bayescl.harness.recipes import load_recipe

    command = "bayescl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    configs = [_bench_config(args, strategy) for strategy in args.strategy]
    for cfg in configs:  # refuse bad input before any work, for every recipe named
        cfg.validate()
        check_runnable(load_recipe(cfg.strategy))
    for cfg in configs:
        run_benchmark(cfg, out_dir=args.out, command=command)
    _print_table(args)
    return 0


def _tune(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from bayescl.harness.tune import TuneConfig, parse_grid, run_tune, tune_candidates

    command = "bayescl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cfg = TuneConfig(run=_bench_config(args, args.strategy or ""), grid=parse_grid(args.grid),
                     grid_file=args.grid_file, tune_tasks=args.tune_tasks, tune_seeds=args.tune_seeds,
                     tune_epochs=args.tune_epochs, name=args.name, min_learned=args.min_learned)
    tune = (tune_candidates(cfg, args.out, command=command) if args.no_final
            else run_tune(cfg, out_dir=args.out, command=command)["tune"])
    print()
    print("| candidate | validation accuracy (%) | each task learned to (%) |\n|---|---|---|")
    for c in tune["candidates"]:
        chosen = " (chosen)" if c["name"] == tune["choice"]["name"] else ""
        if c.get("failed"):
            print(f"| {c['name']} | failed: {c['failed']} | – |")
        else:
            print(f"| {c['name']}{chosen} | {100 * c['val_score']:.2f} | {100 * c['val_learned_min']:.1f} |")
    if args.no_final:
        print("\n--no-final: the choice was not run on the whole stream; no test data was read.")
        return 0
    _print_table(args)
    return 0


def _data(args: argparse.Namespace) -> int:
    from bayescl.harness.data import data_root
    from bayescl.harness.fetch import canonical, check_files, ensure_dataset

    root = data_root(args.data_root)
    raw = ensure_dataset(args.dataset, root) if args.action == "fetch" else root / canonical(args.dataset) / "raw"
    checks = check_files(args.dataset, root)
    for f, status in checks.items():
        print(f"{status.split()[0]:<7} {raw / f}{status[3:] if status.startswith('BAD') else ''}")
    bad = [f for f, status in checks.items() if status != "OK"]
    if bad:
        print(f"bayescl: {len(bad)} of {len(checks)} files in {raw} are missing or fail the MD5 check; re-fetch them "
              f"(delete them, then `bayescl data fetch {args.dataset}`).", file=sys.stderr)
    return 1 if bad else 0


def _report(args: argparse.Namespace) -> int:
    from bayescl.harness.report import write_report

    for p in write_report(args.results_dir):
        print(p)
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``bayescl`` argument parser (every argument has a help text)."""
    ap = argparse.ArgumentParser(prog="bayescl", description="Bayesian continual learning: benchmarks, data "
                                 "and reports (the library itself is used from Python: import bayescl).")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{bench,tune,data,report}")
    _add_bench(sub)
    _add_tune(sub)
    d = sub.add_parser("data", help="dataset files", description="Dataset files in torchvision's layout.")
    dsub = d.add_subparsers(dest="action", required=True, metavar="{fetch,verify}")
    f = dsub.add_parser("fetch", help="make sure a dataset's IDX files exist (download, else an offline mirror)",
                        description="Make sure a dataset's four IDX files exist under the data root, fetching "
                                    "them if not, and check their MD5 sums.")
    v = dsub.add_parser("verify", help="check a dataset's IDX files against their published MD5 sums",
                        description="Check the four IDX files under the data root against their published MD5 "
                                    "sums without fetching anything: one line per file (OK, BAD or MISSING); "
                                    "exit status 1 when any file is not OK.")
    for p, verb in ((f, "fetch"), (v, "verify")):
        p.add_argument("dataset", choices=["mnist", "fashion-mnist"], help=f"the dataset to {verb}")
        p.add_argument("--data-root", default=None, help="data root (default: $BAYESCL_DATA, else ./data)")
    r = sub.add_parser("report", help="rewrite tables and plots from results JSON",
                       description="Rewrite every scenario's README.md table and plots, and the overview.")
    r.add_argument("results_dir", nargs="?", default="benchmarks/results",
                   help="results folder (default: %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run = {"bench": _bench, "tune": _tune, "data": _data, "report": _report}[args.cmd]
    try:
        return run(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"bayescl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
