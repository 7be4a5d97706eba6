"""ResumableDataLoader: each epoch's order from (seed, epoch) only, and a position Lightning restores; the callbacks
warn once when a fit resumes with a loader Lightning cannot resume."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from bayescl import ClassifierModule, LaplaceCallback, ResumableDataLoader, synthetic_stream

DATA = TensorDataset(torch.arange(10.0))


def _batches(loader):
    return [b[0].tolist() for b in loader]


def test_order_depends_on_seed_and_epoch_only():
    a, b = ResumableDataLoader(DATA, batch_size=3, shuffle=True, seed=1), ResumableDataLoader(DATA, batch_size=3,
                                                                                            shuffle=True, seed=1)
    torch.manual_seed(0)
    first = _batches(a)
    torch.manual_seed(123)  # the global generator plays no part
    assert _batches(b) == first
    a.sampler.set_epoch(1)
    assert _batches(a) != first and sorted(x for b in _batches(a) for x in b) == list(range(10))
    assert _batches(ResumableDataLoader(DATA, batch_size=3, shuffle=True, seed=2)) != first
    assert _batches(ResumableDataLoader(DATA, batch_size=3)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_state_dict_resumes_after_the_batches_already_trained():
    dl = ResumableDataLoader(DATA, batch_size=3, shuffle=True, seed=0)
    dl.sampler.set_epoch(4)
    full = _batches(dl)
    it = iter(dl)
    next(it), next(it)  # two batches trained, then a checkpoint
    state = dl.state_dict()
    assert state == {"epoch": 4, "yielded": 2}
    fresh = ResumableDataLoader(DATA, batch_size=3, shuffle=True, seed=0)
    fresh.load_state_dict(state)
    assert _batches(fresh) == full[2:]
    assert _batches(fresh) == full  # the skip applies once; the next epoch is whole
    fresh.load_state_dict({"epoch": 4, "yielded": len(full)})  # the saved epoch had ended: nothing to skip
    assert _batches(fresh) == full


def test_own_order_only():
    with pytest.raises(ValueError, match="sampler="):
        ResumableDataLoader(DATA, sampler=list(range(10)))


class _StopAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("stop")


@pytest.mark.parametrize("resumable", [False, True])
def test_resuming_with_a_loader_lightning_cannot_resume_warns_once(make_trainer, small_model, tmp_path, resumable):
    task = synthetic_stream(num_tasks=1, n_train=64, n_test=8)[0]

    def loader():
        if resumable:
            return task.train_dataloader(batch_size=16, shuffle=True, seed=0)
        return DataLoader(task.train, batch_size=16, shuffle=True)

    module, cb = ClassifierModule(small_model(num_tasks=1), num_tasks=1), LaplaceCallback()
    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    with pytest.raises(RuntimeError, match="stop"):  # stopped after step=2.ckpt was written, as a kill would
        make_trainer(cb, 2, extra=[ck, _StopAtStep(3)], enable_checkpointing=True).fit(module, loader())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(LaplaceCallback(), 2).fit(module, loader(), ckpt_path=str(tmp_path / "step=2.ckpt"))
    said = [str(w.message) for w in caught if "cannot resume" in str(w.message)]
    assert len(said) == (0 if resumable else 1)
