"""LaplaceCallback (diag, kron) under DDP with 2 nodes × 1 process on loopback, against one process on the union.

Two node processes (``multinode_job.py`` with ``NODE_RANK=0`` and ``1``, ``MASTER_ADDR=127.0.0.1``, a free
``MASTER_PORT``) and the one-process reference (``ddp_callbacks_job.py 1``) run as subprocesses, each in its own
session, bounded by one deadline and killed as groups afterwards: pytest stays single-process and no process outlives
the test. Both nodes must hold the same posterior bit for bit, equal to the one-process run's to float64 tolerance. With ``BAYESCL_TEST_NO_REDUCE=1`` (no curvature all-reduce)
those comparisons fail.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_callbacks_job as job

METHODS = ("diag", "kron")
N_TRAIN = 32  # ddp_callbacks_job.N_TRAIN: the global task size


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(start_job, args: list[str], log: Path, **extra: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}
    for name in ("LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", *(() if "NODE_RANK" in extra else ("NODE_RANK",))):
        env.pop(name, None)
    if "MASTER_PORT" not in extra:
        env.pop("MASTER_PORT", None)
    return start_job([sys.executable, *args], log, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, start_job):
    """Node 1, node 0 and the one-process reference, started together and bounded by one 90 s deadline."""
    out = tmp_path_factory.mktemp("multinode")
    (out / "one").mkdir()
    node = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    node_cmd = [str(HERE / "multinode_job.py"), str(out), *METHODS]
    started = {
        "node1": _start(start_job, node_cmd, out / "node1.log", NODE_RANK="1", **node),
        "node0": _start(start_job, node_cmd, out / "node0.log", NODE_RANK="0", **node),
        "one": _start(start_job, [str(HERE / "ddp_callbacks_job.py"), "1", str(out / "one"), *METHODS],
                      out / "one.log"),
    }
    deadline = time.monotonic() + 90.0
    return out, {name: started[name].finish(deadline) for name in started}


def _out(runs) -> Path:
    out, results = runs
    for name, (rc, log, _alive) in results.items():
        assert rc is not None, f"{name} hung past the deadline:\n{log[-3000:]}"
        assert rc == 0, f"{name} failed:\n{log[-3000:]}"
    return out


def test_no_process_outlives_the_runs(runs):
    _out, results = runs
    assert not any(alive for _rc, _log, alive in results.values()), "a process survived the kill of its session"


@pytest.mark.parametrize("method", METHODS)
def test_both_nodes_hold_the_same_posterior_bit_for_bit(runs, method, assert_bitwise_equal):
    out = _out(runs)
    n0, n1 = job.load_numbers(out / f"{method}-node0.pt"), job.load_numbers(out / f"{method}-node1.pt")
    assert n0["num_examples0"] == n0["num_examples1"] == N_TRAIN  # N_t: the global task size, not a node's half
    assert len(n0["servers"][1]["sites"]) == 2
    assert_bitwise_equal(n0, n1)  # servers after each task and the weights


@pytest.mark.parametrize("method", METHODS)
def test_two_nodes_equal_one_process_on_the_union(runs, method, assert_states_close):
    out = _out(runs)
    two = job.load_numbers(out / f"{method}-node0.pt")
    one = job.load_numbers(out / "one" / f"{method}-rank0.pt")
    assert {"servers", "weights"} <= set(two)
    # the one-process job records more (replay memory, function sites: empty for Laplace); compare what a node records
    assert_states_close(two, {k: one[k] for k in two}, 1e-10, method)
