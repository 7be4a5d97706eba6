"""The ``bayescl`` command: ``bench``, ``data`` and ``report`` subcommands.

This module imports nothing heavy at import time (``bayescl --help`` answers without loading torch); each
subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from bayescl.harness.recipes import available_recipes
from bayescl.harness.scenarios import Scenario

#: libraries whose UserWarnings ``bayescl bench`` hides (their deprecations are hidden whatever their source)
_NOISY = r"(pytorch_lightning|lightning|lightning_fabric|torch|torchvision|torchmetrics|avalanche|curvlinops|" \
         r"linear_operator)(\.|$)"


def _quiet_libraries() -> None:
    """Keep library deprecations and Lightning's advice out of ``bayescl bench``'s output (bayescl's own stay)."""
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=_NOISY)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    recipes = ", ".join(available_recipes()) or "(none found)"
    p = sub.add_parser(
        "bench", help="run recipes over a continual-learning scenario and write results",
        description="Run each recipe over a scenario (one Lightning fit per task, every task tested after each), "
                    "write <out>/<scenario>/<recipe>.json and rewrite the scenario's table and plots.",
        epilog=f"recipes: {recipes}. A grid variant is GRID.yaml#NAME (e.g. benchmarks/grids/vcl.yaml#vcl-lv7).",
    )
    p.add_argument("--scenario", required=True,
                   help=f"one of: {', '.join(s.value for s in Scenario)}; or avalanche:SplitMNIST (etc.)")
    p.add_argument("--strategy", nargs="+", required=True, metavar="RECIPE",
                   help=f"recipe name(s) ({recipes}), .yaml path(s) or GRID.yaml#VARIANT")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (default: %(default)s)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per task (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"),
                   help="mlp: the protocol's MLP; cnn: a small CNN, single-head only (default: %(default)s)")
    p.add_argument("--num-tasks", type=int, default=None, help="tasks in the stream (default: the scenario's)")
    p.add_argument("--limit", type=int, default=None,
                   help="examples per task and split, for quick runs (default: all)")
    p.add_argument("--data-root", default=None, help="data root (default: $BAYESCL_DATA, else ./data)")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="Lightning progress bars (default: on in a terminal)")
    p.add_argument("--uncertainty", action=argparse.BooleanOptionalAction, default=True,
                   help="predictive uncertainty and calibration per task after each task (default: on)")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run: keep its finished seeds and continue a seed after its last tested "
                        "task (progress is kept under <out>/<scenario>/_resume/ while a seed runs)")
    p.add_argument("--no-report", action="store_true", help="do not rewrite the scenario's table and plots")


def _bench(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from bayescl.harness.bench import BenchConfig, run_benchmark
    from bayescl.harness.report import load_results, markdown_table, write_report

    command = "bayescl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    configs = [
        BenchConfig(
            scenario=args.scenario, strategy=strategy, seeds=args.seeds, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, model=args.model, num_tasks=args.num_tasks, limit=args.limit,
            root=args.data_root, first_seed=args.first_seed, progress=args.progress,
            uncertainty=args.uncertainty, resume=args.resume,
        )
        for strategy in args.strategy
    ]
    for cfg in configs:
        cfg.validate()  # refuse bad input before any work
    for cfg in configs:
        run_benchmark(cfg, out_dir=args.out, command=command)
    scenario_dir = Path(args.out) / args.scenario.replace(":", "-")
    print()
    print(markdown_table(load_results(scenario_dir)))
    if not args.no_report:
        written = write_report(args.out)
        print("\nwrote " + ", ".join(str(p) for p in written if p.parent == scenario_dir))
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
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{bench,data,report}")
    _add_bench(sub)
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
    run = {"bench": _bench, "data": _data, "report": _report}[args.cmd]
    try:
        return run(args)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"bayescl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
