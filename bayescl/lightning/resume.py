"""Which task to fit next, read from a checkpoint: the one obvious way to resume a whole stream.

>>> # after a crash, in a fresh process:                                                   # doctest: +SKIP
>>> point = resume_point("checkpoints/last.ckpt")
>>> for t in range(point.task, len(stream)):
...     ck = ModelCheckpoint(dirpath="checkpoints", save_last=True, enable_version_counter=False)  # else last-v1.ckpt
...     trainer = pl.Trainer(max_epochs=5, callbacks=[laplace, ck])
...     trainer.fit(model, stream[t].train_dataloader(), ckpt_path=point.ckpt_path if t == point.task else None)

Passing the checkpoint to the fit of ``point.task`` does the right thing either way: inside a task's fit
(``point.finishes_task``) Lightning restores the loops and the fit finishes that task; after a committed task the
callback drops the loop state, so the next task gets its full budget from the checkpoint's weights and posterior.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ResumePoint", "resume_point"]


@dataclass(frozen=True)
class ResumePoint:
    """Where a stream resumes.

    Attributes:
        task: the index of the task to fit next (pass ``ckpt_path`` to that task's ``fit``).
        ckpt_path: the checkpoint.
        finishes_task: ``True`` when the checkpoint was written inside ``task``'s fit (the fit finishes it);
            ``False`` when ``task`` starts afresh from the checkpoint's weights and posterior.
    """

    task: int
    ckpt_path: str
    finishes_task: bool


def _callback_states(checkpoint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    states = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
    return {k: v for k, v in states.items() if isinstance(v, dict) and {"tasks_seen", "task_open"} <= set(v)}


def _newest_checkpoint(folder: str) -> str:
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".ckpt")]
    if not files:
        raise FileNotFoundError(f"ckpt_path={folder!r} is a folder without a .ckpt file.")
    return max(files, key=lambda f: (os.path.getmtime(f), f))


def resume_point(ckpt_path: str | os.PathLike[str]) -> ResumePoint:
    """Read a Lightning checkpoint written with a bayescl callback and say which task to fit next.

    Args:
        ckpt_path: a checkpoint file, or a folder: then its most recently written ``.ckpt`` (so ``last-v1.ckpt``,
            written by a new ``ModelCheckpoint`` per task with Lightning's version counter, is not missed).

    Raises:
        FileNotFoundError: no such file, or a folder without checkpoints.
        ValueError: the checkpoint holds no bayescl callback state, or two callbacks disagree on the task.
    """
    path = os.fspath(ckpt_path)
    if os.path.isdir(path):
        path = _newest_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ckpt_path={path!r} is not a file.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    states = _callback_states(checkpoint)
    if not states:
        raise ValueError(f"ckpt_path={path!r} holds no bayescl callback state (was it written by a Trainer with "
                         "LaplaceCallback, VCLCallback, FunctionalPriorCallback or ReplayCallback?).")
    points = {(int(s["tasks_seen"]), bool(s["task_open"])) for s in states.values()}
    if len(points) > 1:
        raise ValueError(f"the callbacks in {path!r} disagree on the task: {sorted(states)} -> {sorted(points)}.")
    (task, open_), = points
    return ResumePoint(task=task, ckpt_path=path, finishes_task=open_)
