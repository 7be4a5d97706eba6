"""The ``bayescl`` command line as a user first meets it: fast help, every default shown, no library noise."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bayescl.harness.cli import main, parser
from bayescl.harness.recipes import available_recipes

ROOT = Path(__file__).resolve().parents[2]


def _run(*code_or_args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # as a user's shell: warnings are shown
    return subprocess.run([sys.executable, *code_or_args], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _subparsers(ap: argparse.ArgumentParser):
    yield ap
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def test_every_argument_has_help():
    for ap in _subparsers(parser()):
        for action in ap._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(a.help for a in action._choices_actions), ap.prog
            else:
                assert action.help, f"{ap.prog} {action.option_strings or action.dest} has no help"


def test_bench_help_lists_recipes_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in available_recipes():
        assert name in out
    for default in ("number of seeds (default: 1)", "epochs per task (default: 5)",
                    "training batch size (default: 64)",
                    "learning rate of Adam (or of the optimizer a recipe names under module:) (default: 0.001)",
                    "results folder (default: benchmarks/results)", "split-mnist-task", "GRID.yaml#"):
        assert default in out, default


def test_bench_defaults_match_the_runner():
    """The defaults --help shows are the ones BenchConfig (the Python API) uses."""
    from bayescl.harness.bench import BenchConfig

    args = parser().parse_args(["bench", "--scenario", "synthetic", "--strategy", "naive"])
    for f in dataclasses.fields(BenchConfig):
        name = {"root": "data_root"}.get(f.name, f.name)
        if f.default is not dataclasses.MISSING and hasattr(args, name) and f.name != "progress":
            assert getattr(args, name) == f.default, f.name


@pytest.mark.parametrize("cmd", ["bench", "tune"])
def test_help_does_not_import_torch(cmd):
    code = (f"import sys\nfrom bayescl.harness.cli import main\ntry:\n    main(['{cmd}', '--help'])\n"
            "except SystemExit:\n    pass\nheavy = [m for m in ('torch', 'pytorch_lightning', 'numpy') "
            "if m in sys.modules]\nassert not heavy, heavy\nprint('light')")
    proc = _run("-c", code)
    assert proc.returncode == 0 and "light" in proc.stdout, proc.stderr


def test_tune_help_states_the_protocol_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("Chaudhry et al. 2019", "no test data is read", "--grid KEY=V1,V2,...", "--grid-file GRID.yaml",
                 "the first tasks that tuning trains and validates on (default: 3)",
                 "seeds per candidate while tuning, from --first-seed (default: 1)",
                 "for validation, seeded by the run's seed; 0: none (default: 0.1)",
                 "results folder (default: benchmarks/results/tuned)", "laplace-kron"):
        assert text in out, text


def test_tune_defaults_match_the_runner():
    """The defaults ``bayescl tune --help`` shows are TuneConfig's and BenchConfig's."""
    from bayescl.harness.bench import BenchConfig
    from bayescl.harness.tune import TuneConfig

    args = parser().parse_args(["tune", "--scenario", "synthetic", "--strategy", "naive", "--grid", "lam=1"])
    for f in [*dataclasses.fields(TuneConfig), *dataclasses.fields(BenchConfig)]:
        name = {"root": "data_root"}.get(f.name, f.name)
        if f.default is not dataclasses.MISSING and hasattr(args, name) and f.name not in ("progress", "grid"):
            assert getattr(args, name) == f.default, f.name
    assert args.tune_epochs is None and args.grid == ["lam=1"]


@pytest.mark.slow
def test_bench_output_has_no_library_warnings(tmp_path):
    """A kron recipe imports curvlinops (whose linear_operator warns about torch.jit.script) mid-run."""
    proc = _run("-m", "bayescl.harness.cli", "bench", "--scenario", "synthetic", "--strategy", "laplace-kron",
                "--epochs", "1", "--num-tasks", "2", "--no-progress", "--no-uncertainty", "--no-report",
                "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert "| laplace-kron |" in proc.stdout


def test_data_verify_reports_each_file_and_exits_nonzero_on_a_bad_one(tmp_path, capsys):
    """``bayescl data verify`` checks the published MD5 sums without fetching: OK / BAD / MISSING per file."""
    import numpy as np

    from bayescl.harness.fetch import FILES, write_idx

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / FILES[1], np.full(4, 200))
    assert main(["data", "verify", "mnist", "--data-root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 4 and lines[1].startswith(f"BAD     {raw / FILES[1]} (md5 ")
    assert all(line.startswith("MISSING ") for i, line in enumerate(lines) if i != 1)
    assert "4 of 4 files" in err and "bayescl data fetch mnist" in err
    assert not (raw / FILES[0]).exists()  # verify never fetches


def test_data_verify_passes_on_the_published_files(data_root, capsys):
    assert main(["data", "verify", "mnist", "--data-root", str(data_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("OK ") for line in lines)


def test_data_verify_cli_exit_code(tmp_path):
    assert _run("-m", "bayescl.harness.cli", "data", "verify", "fashion-mnist", "--data-root", str(tmp_path),
                timeout=120).returncode == 1
