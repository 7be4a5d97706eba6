"""The ``ddp_spawn`` handoff of :mod:`bayescl.lightning.spawn`, in one process.

A spawned worker is imitated by unpickling the callback with ``os.getpid`` reporting another process; the real
two-process ``ddp_spawn`` runs are in ``test_ddp_callbacks.py``.
"""

from __future__ import annotations

import os
import pickle

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from bayescl import ClassifierModule, LaplaceCallback, synthetic_stream
from bayescl.lightning import spawn


def _fit(cb, module, task, make_trainer):
    make_trainer(cb).fit(module, DataLoader(task.train, batch_size=32))


@pytest.fixture
def fitted(make_trainer, small_model):
    stream = synthetic_stream(num_tasks=2, n_train=64, n_test=8, seed=0)
    module = ClassifierModule(small_model(num_tasks=2), num_tasks=2, lr=1e-2)
    cb = LaplaceCallback(structure="diag")
    _fit(cb, module, stream[0], make_trainer)
    return cb, module, stream


def test_the_calling_process_reads_back_what_the_worker_fitted(fitted, make_trainer, monkeypatch,
                                                              assert_bitwise_equal):
    parent, module, stream = fitted
    worker = pickle.loads(pickle.dumps(parent))  # what ddp_spawn does (once per worker)
    again = pickle.loads(pickle.dumps(parent))
    assert worker._spawn_box == again._spawn_box == parent._spawn_box  # every copy names the same file
    real_pid = os.getpid()
    monkeypatch.setattr(spawn.os, "getpid", lambda: real_pid + 1)  # "inside the worker"
    _fit(worker, module, stream[1], make_trainer)
    assert worker.tasks_seen == 2 and os.path.exists(parent.__dict__["_spawn_box"])
    monkeypatch.setattr(spawn.os, "getpid", lambda: real_pid)  # back in the calling process
    assert parent.__dict__["tasks_seen"] == 1  # not read yet ...
    assert parent.tasks_seen == 2  # ... the first public access reads it
    assert parent.server.names == worker.server.names == ("task-0", "task-1")
    assert_bitwise_equal(parent.server.state_dict(), worker.server.state_dict())
    assert parent.__dict__["_spawn_box"] is None  # read once, file deleted
    assert not os.path.exists(worker.__dict__["_spawn_return"])


def test_a_failed_worker_fit_leaves_the_posterior_as_it_was(fitted):
    parent, _module, _stream = fitted
    before = {n: t.clone() for n, t in parent.posterior().mean.items()}
    pickle.loads(pickle.dumps(parent))  # a worker that never writes its state back
    assert parent.tasks_seen == 1
    assert parent.__dict__["_spawn_box"] is None  # it stops looking for the file
    for n, t in parent.posterior().mean.items():
        assert torch.equal(t, before[n])


def test_rank_one_writes_nothing(fitted, monkeypatch):
    parent, _module, _stream = fitted
    worker = pickle.loads(pickle.dumps(parent))
    monkeypatch.setattr(spawn.os, "getpid", lambda: -1)
    worker.spawn_setup()
    worker.spawn_fit_end(global_rank=1)
    assert not os.path.exists(parent.__dict__["_spawn_box"])


def test_fork_based_strategies_are_refused_before_any_work(small_model):
    cb = LaplaceCallback()
    module = ClassifierModule(small_model(num_tasks=2), num_tasks=2)
    trainer = pl.Trainer(strategy="ddp_fork", devices=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="ddp_fork.*strategy='ddp'"):
        cb.setup(trainer, module, "fit")
    assert cb.server is None and cb.tasks_seen == 0


def test_replay_memory_comes_back_from_a_spawned_worker(make_trainer, small_model, monkeypatch):
    from bayescl import ReplayCallback

    stream = synthetic_stream(num_tasks=2, n_train=64, n_test=8, seed=0)
    module = ClassifierModule(small_model(num_tasks=2), num_tasks=2, lr=1e-2)
    parent = ReplayCallback(memory_per_task=8)
    _fit(parent, module, stream[0], make_trainer)
    worker = pickle.loads(pickle.dumps(parent))
    real_pid = os.getpid()
    monkeypatch.setattr(spawn.os, "getpid", lambda: real_pid + 1)
    _fit(worker, module, stream[1], make_trainer)
    monkeypatch.setattr(spawn.os, "getpid", lambda: real_pid)
    assert sorted(parent.memory) == sorted(worker.memory) == [0, 1]
    for t in (0, 1):
        for a, b in zip(parent.memory[t], worker.memory[t]):
            assert torch.equal(a, b)
