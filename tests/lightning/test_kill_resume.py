"""Kill a real training process with SIGKILL and resume it from ``last.ckpt`` in a fresh one: the final posterior
and weights are bit-identical to an uninterrupted run.

``kill_resume_job.py`` trains three tasks (a new Trainer per task, ``ModelCheckpoint(every_n_train_steps=1,
save_last=True)``) with ``Task.train_dataloader`` (a ResumableDataLoader); it kills itself inside task 1 mid-epoch,
at an epoch boundary, or right after task 1's fit returned. A second process resumes with
``resume_point(<dir>/last.ckpt)``. One uninterrupted reference run per (method, shuffle) is shared by the module; it runs
while the killed run does.

Every subprocess runs in its own process group, under a timeout, and the group is killed afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

JOB = Path(__file__).with_name("kill_resume_job.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120

#: (method, shuffle, kill point): every method under two points and both loader orders, every point twice
CASES = [
    ("vcl", 1, "mid-epoch"), ("vcl", 0, "between-epochs"),
    ("diag", 0, "mid-epoch"), ("diag", 1, "between-tasks"),
    ("kron", 1, "between-epochs"), ("kron", 0, "between-tasks"),
]
EXPECTED_RESUME = {"mid-epoch": "task=1 finishes_task=True", "between-epochs": "task=1 finishes_task=True",
                   "between-tasks": "task=2 finishes_task=False"}


def start_job(*args: str) -> subprocess.Popen:
    """Start the job in its own process group (so that :func:`finish_job` can kill all of it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(JOB), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env, cwd=ROOT)


def finish_job(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for the job (at most ``TIMEOUT_S``), then kill its whole process group whatever happened."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        out, err = "", f"timed out after {TIMEOUT_S} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_job(*args: str) -> subprocess.CompletedProcess:
    return finish_job(start_job(*args))


def tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested dict / list, by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(method, shuffle)`` starts the uninterrupted run of the pair (once) and returns a function that
    waits for it and gives its tensors; it runs while the test's killed run does (two cores)."""
    started: dict[tuple[str, int], tuple[Path, subprocess.Popen]] = {}
    done: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def result(key: tuple[str, int]) -> dict[str, torch.Tensor]:
        if key not in done:
            d, proc = started[key]
            res = finish_job(proc)
            assert res.returncode == 0, res.stderr[-3000:]
            done[key] = tensors(torch.load(d / "out.pt", weights_only=False))
        return done[key]

    def reference(method: str, shuffle: int):
        key = (method, shuffle)
        if key not in started:
            d = tmp_path_factory.mktemp(f"ref-{method}-{shuffle}")
            started[key] = d, start_job("--method", method, "--shuffle", str(shuffle), "--dir", str(d / "ckpt"),
                                        "--out", str(d / "out.pt"))
        return lambda: result(key)

    yield reference
    for _d, proc in started.values():
        finish_job(proc)


@pytest.mark.parametrize("method, shuffle, point", CASES, ids=[f"{m}-{'shuffled' if s else 'ordered'}-{p}"
                                                                  for m, s, p in CASES])
def test_sigkill_then_resume_is_bit_identical(method, shuffle, point, reference, tmp_path):
    common = ["--method", method, "--shuffle", str(shuffle), "--dir", str(tmp_path / "ckpt"),
              "--out", str(tmp_path / "out.pt")]
    want = reference(method, shuffle)  # runs alongside
    killed = run_job(*common, "--kill", point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file() and not (tmp_path / "out.pt").exists()

    resumed = run_job(*common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: {EXPECTED_RESUME[point]}" in resumed.stdout

    got, want = tensors(torch.load(tmp_path / "out.pt", weights_only=False)), want()
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)}/{len(want)} tensors differ from the uninterrupted run, e.g. {differ[:4]}"
