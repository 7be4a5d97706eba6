"""A three-task continual-learning job that ``test_kill_resume.py`` runs in a subprocess, kills and resumes.

One new Trainer per task, each with a new ``ModelCheckpoint(every_n_train_steps=1, save_last=True,
enable_version_counter=False)`` into ``--dir`` (without ``enable_version_counter=False`` each new ModelCheckpoint
writes ``last-v1.ckpt``, ``last-v2.ckpt``..., and ``last.ckpt`` stays at task 0); with ``--kill``
the process sends itself SIGKILL at the named point of task 1 (nothing of Lightning's teardown runs, as in a
crash); with ``--resume`` it reads ``resume_point(<dir>/last.ckpt)``, fits ``stream[point.task]`` from the checkpoint,
then the remaining tasks. At the end it saves the posterior server's ``state_dict`` and the module's weights to
``--out``.

Kill points (all in task 1, the middle task; 3 batches an epoch, 2 epochs a task):

* ``mid-epoch``: at the start of batch 1 of epoch 0 (the last checkpoint was written after batch 0);
* ``between-epochs``: at the start of epoch 1 (the last checkpoint was written after the epoch's last batch);
* ``between-tasks``: right after task 1's ``fit`` returned (the last checkpoint holds the committed task).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import bayescl
from bayescl import ClassifierModule, MultiHeadMLP, resume_point, synthetic_stream

KILL_POINTS = ("mid-epoch", "between-epochs", "between-tasks")
METHODS = ("diag", "kron", "vcl")
NUM_TASKS, EPOCHS, BATCH = 3, 2, 16
KILL_TASK = 1


def make_callback(method: str) -> pl.Callback:
    """The posterior callback of ``method`` (``diag``, ``kron`` or ``vcl``)."""
    if method == "vcl":
        return bayescl.VCLCallback(train_samples=2, test_samples=2)
    return bayescl.LaplaceCallback(structure=method)


class Killer(pl.Callback):
    """SIGKILL this process at a point inside a fit (see the module docstring)."""

    def __init__(self, point: str) -> None:
        self.point = point

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.point == "mid-epoch" and trainer.current_epoch == 0 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.point == "between-epochs" and trainer.current_epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--shuffle", type=int, choices=(0, 1), required=True)
    ap.add_argument("--dir", required=True, help="checkpoint folder")
    ap.add_argument("--out", required=True, help="where the final posterior and weights go (torch.save)")
    ap.add_argument("--kill", choices=KILL_POINTS, default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    stream = synthetic_stream(num_tasks=NUM_TASKS, n_train=3 * BATCH, n_test=8)
    torch.manual_seed(0)
    module = ClassifierModule(MultiHeadMLP(hidden=(16,), num_tasks=NUM_TASKS), num_tasks=NUM_TASKS, lr=1e-2)
    cb = make_callback(args.method)

    first, ckpt_path = 0, None
    if args.resume:
        point = resume_point(Path(args.dir) / "last.ckpt")
        first, ckpt_path = point.task, point.ckpt_path
        print(f"resume: task={point.task} finishes_task={point.finishes_task}", flush=True)
    for t in range(first, NUM_TASKS):
        extra = [Killer(args.kill)] if args.kill and t == KILL_TASK else []
        trainer = pl.Trainer(
            max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_model_summary=False,
            enable_progress_bar=False, num_sanity_val_steps=0, deterministic=True,
            callbacks=[cb, ModelCheckpoint(dirpath=args.dir, every_n_train_steps=1, save_last=True, save_top_k=0,
                                        enable_version_counter=False),
                       *extra],
        )
        loader = stream[t].train_dataloader(batch_size=BATCH, shuffle=bool(args.shuffle), seed=3)
        trainer.fit(module, loader, ckpt_path=ckpt_path if t == first else None)
        if args.kill == "between-tasks" and t == KILL_TASK:
            os.kill(os.getpid(), signal.SIGKILL)
    assert cb.tasks_seen == NUM_TASKS, cb.tasks_seen
    torch.save({"server": cb.server.state_dict(), "model": module.state_dict()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
