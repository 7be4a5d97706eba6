"""The ``bayescl`` command: ``bench``, ``data`` and ``report`` subcommands."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bayescl.harness.data import Scenario


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a recipe over a continual-learning scenario")
    p.add_argument("--scenario", required=True,
                   help=f"one of: {', '.join(s.value for s in Scenario)}, or avalanche:SplitMNIST (etc.)")
    p.add_argument("--strategy", nargs="+", required=True, help="recipe name(s) from strategies/ or .yaml paths")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5, help="epochs per task (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="mlp", help="mlp (the protocol's MLP) or cnn (single-head only)")
    p.add_argument("--num-tasks", type=int, default=None, help="tasks in the stream (default: the scenario's)")
    p.add_argument("--limit", type=int, default=None, help="examples per task and split (quick runs)")
    p.add_argument("--data-root", default=None, help="data root (default $BAYESCL_DATA or ./data)")
    p.add_argument("--out", default="benchmarks/results", help="results folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="Lightning progress bars (default: on in a terminal)")
    p.add_argument("--uncertainty", action=argparse.BooleanOptionalAction, default=True,
                   help="predictive uncertainty and calibration per task after each task (default: on)")
    p.add_argument("--no-report", action="store_true", help="do not rewrite the scenario's table and plots")


def _bench(args: argparse.Namespace) -> int:
    from bayescl.harness.bench import BenchConfig, run_benchmark
    from bayescl.harness.report import load_results, markdown_table, write_report

    command = "bayescl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for strategy in args.strategy:
        cfg = BenchConfig(
            scenario=args.scenario, strategy=strategy, seeds=args.seeds, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, model=args.model, num_tasks=args.num_tasks, limit=args.limit,
            root=args.data_root, first_seed=args.first_seed, progress=args.progress,
            uncertainty=args.uncertainty,
        )
        cfg.validate()  # refuse bad input before any work
    for strategy in args.strategy:
        cfg.strategy = strategy
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
    from bayescl.harness.fetch import ensure_dataset, verify

    root = data_root(args.data_root)
    raw = ensure_dataset(args.dataset, root)
    checks = verify(args.dataset, root)
    for f, ok in checks.items():
        print(f"{'ok ' if ok else 'BAD'} {raw / f}")
    return 0 if all(checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bayescl", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_bench(sub)
    d = sub.add_parser("data", help="dataset files")
    dsub = d.add_subparsers(dest="action", required=True)
    f = dsub.add_parser("fetch", help="make sure a dataset's IDX files exist (download / offline mirror)")
    f.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    f.add_argument("--data-root", default=None)
    r = sub.add_parser("report", help="rewrite tables and plots from results JSON")
    r.add_argument("results_dir", nargs="?", default="benchmarks/results")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "bench":
            return _bench(args)
        if args.cmd == "data":
            return _data(args)
        from bayescl.harness.report import write_report

        for p in write_report(args.results_dir):
            print(p)
        return 0
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"bayescl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
