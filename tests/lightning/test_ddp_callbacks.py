"""LaplaceCallback (diag, kron), VCLCallback, ReplayCallback and FunctionalPriorCallback under Lightning DDP: 2 CPU
processes (gloo) against one process.

The runs are subprocesses (``ddp_callbacks_job.py``; Lightning's launcher re-runs it for rank 1), each in its own
session, bounded by one deadline and killed as a group afterwards, so pytest stays single-process and never hangs.
Two tasks of 32 examples, unshuffled, 8 per rank and step: the one-process reference takes batches of 16, the union of
the two ranks' batches. Setting ``BAYESCL_TEST_NO_REDUCE=1`` removes the curvature all-reduce: the comparisons with
one process then fail. Replay's memory and FROMP's memorable points must be drawn from the whole task (not a rank's
shard) and be the same on every rank: they are compared with each other and with the one-process run's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).resolve().parent / "ddp_callbacks_job.py"
sys.path.insert(0, str(JOB.parent))
import ddp_callbacks_job as job

COMPARED = ("diag", "kron", "vcl", "replay", "functional", "functional-random")
#: each two-process run and the one-process run it must equal ("functional-skewed": rank 0's site on every rank)
REFERENCE = {**{m: m for m in COMPARED}, "functional-skewed": "functional"}
#: ddp_spawn: one Laplace and one VCL callback (each spawned fit costs two fresh interpreters)
SPAWNED = ("diag", "vcl-noisy")
SPAWN_TEARDOWN_RACE = "terminated with signal SIGABRT"


def _start(start_job, devices: int | str, out: Path, methods: tuple[str, ...]):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    env.pop("LOCAL_RANK", None)
    out.mkdir(parents=True, exist_ok=True)
    return start_job([sys.executable, str(JOB), str(devices), str(out), *methods], out / "job.log", env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, start_job):
    """The two-process run (every method), the ddp_spawn run and the one-process reference, started together with one
    deadline."""
    outs = {2: tmp_path_factory.mktemp("two"), 1: tmp_path_factory.mktemp("one"),
            "spawn": tmp_path_factory.mktemp("spawn")}
    started = {2: _start(start_job, 2, outs[2], job.METHODS), 1: _start(start_job, 1, outs[1], COMPARED),
               "spawn": _start(start_job, "spawn", outs["spawn"], SPAWNED)}
    deadline = time.monotonic() + 240.0
    done = {d: (*started[d].finish(deadline), outs[d]) for d in started}
    rc, log = done["spawn"][:2]
    if rc not in (0, None) and SPAWN_TEARDOWN_RACE in log:
        # A spawned gloo worker once aborted in C++ ("terminate called without an active exception", SIGABRT) on a
        # loaded 2-core machine, and torch's spawn failed the fit. That is not the handoff under test, so the job
        # runs once more; any other failure, or the same one twice, fails the test.
        out = tmp_path_factory.mktemp("spawn-again")
        again = _start(start_job, "spawn", out, SPAWNED)
        done["spawn"] = (*again.finish(time.monotonic() + 240.0), out)
    return done


def _out(runs, devices: int | str) -> Path:
    rc, log, _alive, out = runs[devices]
    assert rc is not None, f"the {devices}-process run hung past the deadline:\n{log[-3000:]}"
    assert rc == 0, log[-3000:]
    return out


def test_no_process_outlives_the_runs(runs):
    assert not any(runs[d][2] for d in runs), "a process of a DDP run survived the kill of its session"


@pytest.mark.parametrize("method", job.METHODS)
def test_both_ranks_hold_the_same_posterior_bit_for_bit(runs, method, assert_bitwise_equal):
    out = _out(runs, 2)
    r0, r1 = job.load_numbers(out / f"{method}-rank0.pt"), job.load_numbers(out / f"{method}-rank1.pt")
    if method != "replay":  # replay holds no posterior
        assert r0["num_examples0"] == r0["num_examples1"] == job.N_TRAIN  # N_t: the global task size
        assert len(r0["servers"][1]["sites"]) == 2
    # servers after each task, weights (and VCL's coresets, replay's memory, FROMP's function sites)
    assert_bitwise_equal(r0, r1)


@pytest.mark.parametrize("method", REFERENCE)
def test_two_processes_equal_one_process_on_the_union(runs, method, assert_states_close):
    """Replay too: every rank adds the same replay gradient (one rank's batch size, BS) to DDP's average over the
    union of the ranks' batches, which is the step of one process on the union with ``replay_batch_size=BS``."""
    two = job.load_numbers(_out(runs, 2) / f"{method}-rank0.pt")
    one = job.load_numbers(_out(runs, 1) / f"{REFERENCE[method]}-rank0.pt")
    if method != "replay":
        assert two["num_examples0"] == one["num_examples0"] == job.N_TRAIN
    rtol = 1e-4 if method == "vcl" else 1e-10  # VCL trains in float32, the others in float64


    assert_states_close(two, one, rtol, method)


def test_vcl_coresets_are_the_same_on_every_rank(runs):
    out = _out(runs, 2)
    for method in ("vcl", "vcl-noisy"):
        c0, c1 = job.load_numbers(out / f"{method}-rank0.pt")["coresets"], job.load_numbers(out / f"{method}-rank1.pt")["coresets"]
        assert sorted(c0) == sorted(c1) == [0, 1]
        for t in c0:
            assert len(c0[t][0]) == job.CORESET
            assert all(torch.equal(a, b) for a, b in zip(c0[t], c1[t]))


def _rows(stored_x: torch.Tensor, task: int, method: str) -> list[int]:
    """The index in the task's dataset of each stored input (rank ``r``'s shard holds the indices ``r, r + 2, …``)."""
    x = job.task_data(task, method).tensors[0].flatten(1).double()
    return [int(torch.nonzero((x == row).all(1))[0]) for row in stored_x.flatten(1).double()]


def test_replay_memory_and_batches_are_the_whole_tasks_and_the_same_on_every_rank(runs, assert_bitwise_equal):
    out = _out(runs, 2)
    r0, r1 = job.load_numbers(out / "replay-rank0.pt"), job.load_numbers(out / "replay-rank1.pt")
    one = job.load_numbers(_out(runs, 1) / "replay-rank0.pt")
    assert sorted(r0["memory"][1]) == [0, 1]
    assert_bitwise_equal(r0["memory"], r1["memory"])
    assert_bitwise_equal(r0["memory"], one["memory"])  # stored data: bit for bit the one-process draw
    for t in (0, 1):
        rows = _rows(r0["memory"][1][t][0], t, "replay")
        assert len(set(rows)) == job.MEMORY
        assert {r % 2 for r in rows} == {0, 1}  # from both ranks' shards
        assert (r0["memory"][1][t][2] == t).all()  # task ids route replayed rows to their own head
    # the replay batch is the same on every rank, of one rank's batch size by default (BS, not the union's 2 * BS)
    assert len(r0["replay_batch0"][0]) == job.BS < job.MEMORY
    assert_bitwise_equal(r0["replay_batch0"], r1["replay_batch0"])
    assert_bitwise_equal(r0["replay_batch0"], one["replay_batch0"])
    assert r0["last_replay_loss"] is not None and one["last_replay_loss"] is not None  # task 1 did replay


@pytest.mark.parametrize("method", ["functional", "functional-skewed", "functional-random"])
def test_functional_sites_are_the_whole_tasks_and_the_same_on_every_rank(runs, method, assert_bitwise_equal):
    """Memorable points chosen from the whole task, as one process chooses them, and rank 0's site on every rank
    even when rank 1 computes other scores ("functional-skewed")."""
    out = _out(runs, 2)
    r0, r1 = job.load_numbers(out / f"{method}-rank0.pt"), job.load_numbers(out / f"{method}-rank1.pt")
    one = job.load_numbers(_out(runs, 1) / f"{REFERENCE[method]}-rank0.pt")
    assert [list(s) for s in r0["sites"]] == [["task-0"], ["task-0", "task-1"]]
    assert_bitwise_equal(r0["sites"], r1["sites"])  # points, outputs and kernels
    assert r0["draws1"] == one["draws1"] > 0  # task 1 added the functional gradient at every step
    for t in (0, 1):
        site = r0["sites"][1][f"task-{t}"]
        assert_bitwise_equal(site["inputs"], one["sites"][1][f"task-{t}"]["inputs"])  # the same points
        rows = _rows(site["inputs"][0], t, "functional")
        assert len(set(rows)) == job.MEMORY and {r % 2 for r in rows} == {0, 1}
        assert site["kernel"].shape == (2, job.MEMORY, job.MEMORY) and site["kernel"].abs().max() > 0


class _Restored(Exception):
    pass


@pytest.mark.parametrize("method", ["diag", "kron", "vcl-noisy", "replay", "functional"])
def test_a_ddp_checkpoint_restores_the_same_posterior_in_one_process(runs, method, assert_bitwise_equal):
    import pytorch_lightning as pl

    out = _out(runs, 2)
    ckpt = out / f"ckpt-{method}-1" / "last.ckpt"  # written (by rank 0) after task 1 was committed
    assert ckpt.is_file()
    module, cb, seen = job.make_module(), job.make_callback(method), {}

    class Capture(pl.Callback):  # first in the list: sees the restored state before anything trains
        def on_train_start(self, trainer, pl_module):
            seen["server"] = job.numbers_only(cb.server.state_dict()) if method != "replay" else None
            seen["coresets"] = {t: list(c) for t, c in getattr(cb, "coresets", {}).items()}
            seen["memory"] = {t: list(m) for t, m in getattr(cb, "memory", {}).items()}
            seen["sites"] = {k: s.state_dict() for k, s in getattr(cb, "sites", {}).items()}
            raise _Restored

    precision = "32-true" if method.startswith("vcl") else "64-true"
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         precision=precision, callbacks=[Capture(), cb])
    with pytest.raises(_Restored):
        trainer.fit(module, job.loader(job.task_data(1, method), 1), ckpt_path=ckpt)
    saved = job.load_numbers(out / f"{method}-rank0.pt")
    if method == "replay":
        assert_bitwise_equal(seen["memory"], saved["memory"][1])
        return
    assert_bitwise_equal(seen["server"], saved["servers"][1])
    if method.startswith("vcl"):
        assert_bitwise_equal(seen["coresets"], saved["coresets"])
    if method == "functional":
        assert_bitwise_equal(seen["sites"], saved["sites"][1])


def test_ddp_spawn_brings_the_posterior_back_to_the_calling_process(runs, assert_states_close):
    """Under ddp_spawn the fit runs in pickled copies; the callback in this process must end with their posterior
    (and the module with their weights), equal to the one-process run on the union of the shards."""
    spawned = job.load_numbers(_out(runs, "spawn") / "diag-spawn.pt")
    one = job.load_numbers(_out(runs, 1) / "diag-rank0.pt")
    assert spawned["num_examples0"] == job.N_TRAIN
    assert len(spawned["servers"][0]["sites"]) == 1 and len(spawned["servers"][1]["sites"]) == 2
    # 1e-7, not 1e-10: the spawned workers build the base prior from a float64 module, the one-process run from the
    # float32 module before Lightning casts it (1e-4 rounded to float32: 2.5e-12 apart)
    assert_states_close(spawned, one, 1e-7, "diag-spawn")


def test_ddp_spawn_brings_vcl_state_and_means_back(runs):
    rec = job.load_numbers(_out(runs, "spawn") / "vcl-noisy-spawn.pt")
    assert len(rec["servers"][1]["sites"]) == 2
    assert sorted(rec["coresets"]) == [0, 1]
    assert all(len(tensors[0]) == job.CORESET for tensors in rec["coresets"].values())  # (x, y, task id) rows
    # the posterior mean the workers fitted is what the returned module holds (weights and state came back together)
    for name, (mu_name, _) in rec["logical_names"].items():
        torch.testing.assert_close(rec["posterior_mean"][name], rec["weights"][mu_name], rtol=0, atol=0)


def test_replay_refuses_data_without_a_length_under_ddp_before_any_step(monkeypatch):
    """Each rank's IterableDataset yields its own stream: a reservoir over it would store another memory on every
    rank, so under DDP (faked here: one process that believes it is rank 0 of 2) the fit stops before its first step."""
    import pytorch_lightning as pl
    from torch import nn
    from torch.utils.data import DataLoader, IterableDataset

    from bayescl import ClassifierModule
    from bayescl.lightning import replay

    class Stream(IterableDataset):
        def __iter__(self):
            return iter([(torch.randn(2), torch.tensor(i % 2)) for i in range(8)])

    monkeypatch.setattr(replay, "is_distributed", lambda: True)
    monkeypatch.setattr(replay, "rank_and_world", lambda: (0, 2))
    cb = replay.ReplayCallback(memory_per_task=3)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    with pytest.raises(ValueError, match=r"under DDP \(2 processes\).*IterableDataset"):
        trainer.fit(ClassifierModule(nn.Linear(2, 2), num_tasks=1), DataLoader(Stream(), batch_size=4))
    assert trainer.global_step == 0 and cb.memory == {} and cb.tasks_seen == 0
