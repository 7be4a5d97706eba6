"""When a task opens and when its site is committed, inside whatever Trainer the user has.

A callback's checkpointed state says which task it is in: ``tasks_seen`` (committed tasks) and ``task_open`` (a fit
of task ``tasks_seen`` has started and its site is not committed yet). From that:

* **Commit** happens once per task, at the end of a fit that trained (``on_train_end``; or ``on_fit_end`` for a
  resumed fit whose loops had already finished). ``fast_dev_run``, ``limit_train_batches=0``, a fit with no
  optimizer step, and a fit that raised or was interrupted commit nothing, and say so once.
* **Checkpoints.** After the commit, the checkpoint Lightning wrote last for this fit (``ModelCheckpoint``'s
  ``last.ckpt``, or its latest file when it monitors nothing) is written again, so the task's site is in it.
* **Resume.** A checkpoint written inside task *t*'s fit (task open) resumes task *t*: Lightning restores the loops
  and the fit finishes it. A checkpoint written after task *t* was committed starts task *t + 1* with a full
  budget: its loop state is dropped and the optimizer starts fresh, as with a new Trainer per task.
  :func:`bayescl.lightning.resume.resume_point` reads a checkpoint and says which task to fit next.
* **A reused Trainer.** Lightning's ``max_epochs`` counts across fits; when a later fit would train nothing, the
  callback extends ``max_epochs`` by the budget of the Trainer's first fit (and warns once).
* **Conflicts.** Two posterior callbacks on the same parameters of one Trainer are refused in ``setup``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytorch_lightning as pl
from torch import nn

__all__ = ["TaskLifecycle", "posterior_callbacks"]


def posterior_callbacks(trainer: pl.Trainer) -> list[Any]:
    """The bayescl posterior callbacks attached to ``trainer`` (anything with a ``posterior_server_key``)."""
    return [cb for cb in trainer.callbacks if hasattr(cb, "posterior_server_key")]


def _stateful(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


class TaskLifecycle:
    """The task bookkeeping of :class:`~bayescl.lightning.base.PosteriorCallback` (see the module docstring).

    Subclasses provide ``end_task(trainer, pl_module)`` (the commit), ``open_task(pl_module)`` (what a new task
    needs before its first step), ``selected_params`` and ``posterior_server_key``.
    """

    tasks_seen: int
    auto_end_task: bool = True
    #: the callback replaces the model's layers (VCL): no other posterior callback can share its Trainer
    swaps_layers: bool = False

    def _init_lifecycle(self) -> None:
        self.task_open = False
        #: optimizer steps taken in the open task (across resumes)
        self.task_steps = 0
        self._fit_committed = False
        self._fresh_optimizer = False
        self._first_trainer: tuple[int, int] | None = None  # (id of the Trainer, its first fit's epoch budget)
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"bayescl: {message}", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ setup: conflicts and reuse
    def check_conflicts(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        """Refuse a second posterior callback on the same parameters (two prior terms would be added)."""
        others = [cb for cb in posterior_callbacks(trainer) if cb is not self]
        if not others:
            return
        mine = set(self.selected_param_ids(pl_module))
        for cb in others:
            if self.swaps_layers or cb.swaps_layers:
                raise ValueError(f"{type(self).__name__} and {type(cb).__name__} are attached to one Trainer: "
                                 "VCLCallback replaces the layers the other callback holds a posterior over. Use "
                                 "one posterior callback per Trainer.")
            shared = mine & set(cb.selected_param_ids(pl_module))
            if shared:
                raise ValueError(f"two posterior callbacks ({self.state_key} and {cb.state_key}) hold a prior over "
                                 f"the same {len(shared)} parameters, so each step would add two prior terms. Use "
                                 "one callback, or give each a disjoint params= selection (and a state_key_suffix).")

    def extend_reused_budget(self, trainer: pl.Trainer) -> None:
        """Give each fit of a reused Trainer the epoch budget of its first fit (``max_epochs`` is cumulative)."""
        max_epochs = trainer.max_epochs
        if self._first_trainer is None or self._first_trainer[0] != id(trainer):
            budget = None if max_epochs in (None, -1) else max_epochs - trainer.current_epoch
            self._first_trainer = (id(trainer), budget)
            return
        budget = self._first_trainer[1]
        if budget is None or max_epochs is None or trainer.current_epoch < max_epochs:
            return
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            raise ValueError(f"this Trainer has already reached max_steps={trainer.max_steps}, so the next fit would "
                             "train nothing; use a new Trainer per task, or raise trainer.fit_loop.max_steps first.")
        new = trainer.current_epoch + budget
        self._warn_once("reuse", f"the Trainer is reused and max_epochs counts across fits: max_epochs is raised "
                                 f"from {max_epochs} to {new} so that this task gets {budget} epochs, like the first.")
        trainer.fit_loop.max_epochs = new

    # ------------------------------------------------------------------ resume
    def lifecycle_state(self) -> dict[str, Any]:
        return {"tasks_seen": self.tasks_seen, "task_open": self.task_open, "task_steps": self.task_steps}

    def load_lifecycle_state(self, state: dict[str, Any]) -> None:
        self.tasks_seen = int(state.get("tasks_seen", 0))
        self.task_open = bool(state.get("task_open", False))
        self.task_steps = int(state.get("task_steps", 0))

    def start_from_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written after a committed task starts the next task: drop its loop state (full budget)
        and start the optimizer afresh (at ``on_train_start``)."""
        state = checkpoint.get("callbacks", {}).get(self.state_key, {})
        if not state.get("task_open", False):
            checkpoint.pop("loops", None)
            self._fresh_optimizer = True

    # ------------------------------------------------------------------ hooks the base class calls
    def lifecycle_setup(self, trainer: pl.Trainer | None, pl_module: nn.Module, stage: str) -> None:
        if stage != "fit" or trainer is None:
            return
        self.check_conflicts(trainer, pl_module)
        self.extend_reused_budget(trainer)
        self._fit_committed = False
        self._fresh_optimizer = False

    def lifecycle_train_start(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        if self._fresh_optimizer:  # a new task from a committed checkpoint: a new optimizer, as a new Trainer has
            for opt in trainer.optimizers:
                opt.state.clear()
            self._fresh_optimizer = False
        if trainer.ckpt_path is not None and not _stateful(trainer.train_dataloader):
            self._warn_once("loader", "this fit resumes from a checkpoint with a train DataLoader Lightning cannot "
                                      "resume (no state_dict): it restarts at batch 0 (and draws a new order) while "
                                      "Lightning counts from the saved batch, so the run differs from an "
                                      "uninterrupted one. Use bayescl.lightning.ResumableDataLoader.")
        if not self.task_open:
            self.open_task(pl_module)
            self.task_open, self.task_steps = True, 0

    def count_step(self) -> None:
        self.task_steps += 1

    def _not_training(self, trainer: pl.Trainer) -> str | None:
        if trainer.fast_dev_run:
            return "fast_dev_run"
        if trainer.limit_train_batches == 0:
            return "limit_train_batches=0"
        if self.task_steps == 0:
            return "no optimizer step ran (an empty loader, or the loop had nothing left to do)"
        return None

    def auto_commit(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        """Commit the open task at the end of a fit that trained; otherwise keep the posterior and say why."""
        if not self.auto_end_task or not self.task_open or self._fit_committed:
            return
        if (why := self._not_training(trainer)) is not None:
            self._warn_once(f"nocommit-{why}", f"{why}: task {self.tasks_seen} is not committed, the posterior is "
                                               "unchanged.")
            return
        self.end_task(trainer, pl_module)
        self._fit_committed = True
        self.resave_checkpoints(trainer)

    def lifecycle_fit_end(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        if trainer.interrupted:
            return
        if not self.task_open and not self._fit_committed and self.auto_end_task:
            # Lightning skipped the loop (limit_train_batches=0, an empty loader): no task was opened
            why = self._not_training(trainer) or "no optimizer step ran"
            self._warn_once(f"nocommit-{why}", f"{why}: task {self.tasks_seen} is not committed, the posterior is "
                                               "unchanged.")
            return
        # a resumed fit whose loops had already finished never reaches on_train_end
        if trainer.train_dataloader is not None:
            self.auto_commit(trainer, pl_module)

    def lifecycle_exception(self, trainer: pl.Trainer, exception: BaseException) -> None:
        if self.task_open:
            self._warn_once("exception", f"the fit stopped ({type(exception).__name__}): task {self.tasks_seen} is "
                                         "not committed and the posterior is unchanged; resume from the last "
                                         "checkpoint to finish it.")

    def check_manual_commit(self, trainer: pl.Trainer | None) -> None:
        """Refuse a second commit of the task this fit already committed."""
        if trainer is not None and self._fit_committed:
            raise ValueError(f"task {self.tasks_seen - 1} was already committed at the end of this fit "
                             "(auto_end_task=True); call end_task yourself only with auto_end_task=False.")

    # ------------------------------------------------------------------ checkpoints written again
    def resave_checkpoints(self, trainer: pl.Trainer) -> None:
        """Write again the checkpoint each ModelCheckpoint wrote last in this fit, now with the committed site."""
        for ck in trainer.checkpoint_callbacks:
            path = ck.last_model_path or (ck.best_model_path if ck.monitor is None else "")
            if not path:
                if ck.monitor is not None:
                    self._warn_once("monitor", f"ModelCheckpoint(monitor={ck.monitor!r}) without save_last: none of "
                                               "its files holds this task's site; add save_last=True.")
                continue
            # rank 0 wrote the file: its answer holds for every rank (save_checkpoint has a barrier inside)
            if trainer.strategy.broadcast(os.path.exists(path)):
                trainer.save_checkpoint(path, weights_only=ck.save_weights_only)
