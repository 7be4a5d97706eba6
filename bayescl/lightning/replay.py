"""Experience replay (ER) as a Lightning callback: the rehearsal baseline at a fixed memory per task.

After each task the callback keeps ``memory_per_task`` examples of it (drawn uniformly without replacement, seeded
by ``(seed, task)``); while a later task trains, every optimizer step adds the loss of one *replay minibatch* of
``replay_batch_size`` examples, drawn uniformly from the memory of all earlier tasks, to the task loss:

.. math::  \\nabla_\\theta \\big[\\ell_{\\text{task}}(\\theta; B_t) + \\ell(\\theta; B_{\\text{mem}})\\big],
   \\qquad B_{\\text{mem}} \\subset \\bigcup_{s<t} M_s,\\ |M_s| = \\text{memory\\_per\\_task}.

The mechanism is the one every bayescl callback uses to add a term (``docs/design.md``): in
``on_before_optimizer_step`` (once per optimizer step whatever ``accumulate_grad_batches`` is, after AMP unscaling,
before gradient clipping) the replay loss is differentiated with :func:`torch.autograd.grad` and its gradient is
added to ``p.grad`` of the parameters the optimizer is about to step (``p.grad`` is set where the task batch gave
none: the heads of old tasks in a multi-head model). The user's LightningModule is unchanged. The replay forward
runs in the parameters' dtype outside any mixed-precision autocast, so its gradient needs no loss scaling.

The replay loss is the module's own: ``loss="training_step"`` (default) calls ``pl_module.training_step`` on the
replay batch with its ``self.log`` / ``self.log_dict`` calls dropped (whatever else it does, e.g. updating a
metric, also sees the replay batch); ``"cross_entropy"`` or a callable ``(logits, y) -> loss`` calls
``pl_module(*inputs)`` instead (the only choice with manual optimization). Batches follow :mod:`bayescl._batches`:
``(x, y)`` (domain- and class-incremental, one head) or ``(x, y, task_id)`` (task-incremental: the stored task ids
route each replayed row to its own head).

Avalanche's ``ReplayPlugin`` concatenates the two minibatches and averages the loss over both, i.e. half this
gradient; with Adam the scale hardly matters.

Task boundaries, checkpoints and resume follow :mod:`bayescl.lightning.lifecycle` like the posterior callbacks: the
memory of task ``t`` is taken at the end of its fit, a new Trainer per task and one reused Trainer give the same
memory, the memory is saved in checkpoints (``replay/<state_key>``), and the replay batch of each step is drawn from
``(seed, task, step)``, so a resumed run replays exactly the batches an uninterrupted one does.

**Under DDP** (``strategy="ddp"``) the replay gradient is added after DDP has averaged the task gradients, so it
must be the same on every rank (else the ranks' weights drift apart and a checkpoint written by rank 0 describes no
other rank). It is, with no communication:

* **The memory is drawn from the whole task, the same on every rank.** Each rank's training loader holds only its
  ``DistributedSampler`` shard, but its ``dataset`` is the whole task on every rank; the memory is drawn from it
  (indices from a generator seeded by ``(seed, task)``, no rank), so every rank stores the examples one process
  would. Data without a length (an ``IterableDataset``) gives each rank its own stream, whose reservoir would differ
  between ranks: under DDP it is refused when the fit starts, before any step.
* **The replay batch is the same on every rank, by design.** Step ``k``'s batch comes from ``(seed, task, k)``,
  not the rank, so every rank computes the same replay gradient and adds it to the same averaged task gradient.
  (A batch per rank would need a second all-reduce per step, of the replay gradients.) Its default size is the
  training loader's ``batch_size``, i.e. **one rank's** batch: with ``W`` ranks of ``b`` examples, a step is the
  task loss averaged over the ``W b`` examples of the union of the ranks' batches plus the replay loss over ``b``
  stored examples: one process on the union batch with ``replay_batch_size=b`` takes the same step. The replay
  gradient is recomputed on every rank: bit-identical given deterministic kernels (CPU; on a GPU
  ``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from bayescl._batches import move_inputs, split_batch
from bayescl._checks import check_positive_int
from bayescl.lightning.distributed import is_distributed, rank_and_world
from bayescl.lightning.lifecycle import TaskLifecycle
from bayescl.lightning.spawn import SpawnHandoff, check_launcher
from bayescl.lightning.vcl_noise import mix
from bayescl.methods.coresets import stack_dataset

__all__ = ["ReplayCallback"]

LOSSES = ("training_step", "cross_entropy")


def _reservoir(loader: Any, size: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """``size`` examples drawn uniformly from one pass over ``loader`` (Algorithm R), for data without a length."""
    kept: list[tuple[Tensor, ...]] = []
    seen = 0
    for batch in loader:
        inputs, y = split_batch(batch)
        fields = (*inputs, y)
        for i in range(len(y)):
            row = tuple(torch.as_tensor(f[i]).detach().cpu().clone() for f in fields)
            if seen < size:
                kept.append(row)
            else:
                j = int(torch.randint(seen + 1, (1,), generator=generator))
                if j < size:
                    kept[j] = row
            seen += 1
    if not kept:
        raise ValueError("the training data of this task is empty: there is nothing to store for replay.")
    return tuple(torch.stack([r[k] for r in kept]) for k in range(len(kept[0])))


def _map_style(data: Any) -> bool:
    """Whether ``data`` is a map-style dataset with a length (the whole task on every rank under DDP)."""
    return data is not None and hasattr(data, "__len__") and not isinstance(data, IterableDataset)


def _check_ddp_data(loader: Any) -> None:
    """``ValueError`` under DDP for a training loader whose data has no length (each rank would store another
    memory); nothing in one process."""
    if is_distributed() and not _map_style(getattr(loader, "dataset", None)):
        raise ValueError(f"under DDP ({rank_and_world()[1]} processes) ReplayCallback draws each task's memory "
                         "from the training loader's dataset, the whole task on every rank, so that every rank "
                         "stores the same examples; this loader's data has no length (an IterableDataset?), whose "
                         "stream differs between ranks. Use a map-style dataset (a DistributedSampler shards it).")


@contextlib.contextmanager
def _muted_logging(module: nn.Module) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing inside the block (instance attributes, removed after)."""
    def noop(*args: object, **kwargs: object) -> None:
        return None

    module.__dict__["log"], module.__dict__["log_dict"] = noop, noop
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


class ReplayCallback(SpawnHandoff, TaskLifecycle, pl.Callback):
    """Experience replay at a fixed memory per task (see the module docstring for the maths and the mechanism).

    Args:
        memory_per_task: examples kept from each task (all of them when a task has fewer, with a warning).
        replay_batch_size: examples in the replay minibatch of each optimizer step (fewer while the memory holds
            fewer); ``None``: the training loader's ``batch_size`` (else the size of the fit's first batch); under
            DDP one rank's batch size, the same batch on every rank (module docstring).
        loss: ``"training_step"`` (the module's own ``training_step`` on the replay batch, logging dropped),
            ``"cross_entropy"``, or a callable ``(logits, y) -> scalar loss`` applied to ``pl_module(*inputs)``.
        seed: seeds the choice of each task's memory (with the task index) and each step's replay batch (with the
            task index and the step).
        state_key_suffix: distinguishes two instances on one Trainer.

    Raises:
        TypeError: ``memory_per_task``, ``replay_batch_size`` or ``seed`` is not an int, ``loss`` neither a name
            nor a callable.
        ValueError: ``memory_per_task`` or ``replay_batch_size`` is below 1, or ``loss`` is an unknown name.
    """

    def __init__(self, memory_per_task: int = 200, replay_batch_size: int | None = None,
                 loss: str | Callable[[Tensor, Tensor], Tensor] = "training_step", seed: int = 0,
                 state_key_suffix: str = "") -> None:
        self.memory_per_task = check_positive_int(memory_per_task, "memory_per_task")
        self.replay_batch_size = (None if replay_batch_size is None
                                  else check_positive_int(replay_batch_size, "replay_batch_size"))
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"loss={loss!r} is not valid; allowed: {', '.join(map(repr, LOSSES))} or a callable "
                                 "(logits, y) -> loss.")
        elif not callable(loss):
            raise TypeError(f"loss must be {' or '.join(map(repr, LOSSES))} or a callable (logits, y) -> loss, got "
                            f"{type(loss).__name__}.")
        self.loss = loss
        self.seed = check_positive_int(seed, "seed", allow_zero=True)
        self._suffix = str(state_key_suffix)
        #: the stored examples of each committed task: ``(x, y)`` or ``(x, y, task_id)``, on the CPU
        self.memory: dict[int, tuple[Tensor, ...]] = {}
        self.tasks_seen = 0
        #: seconds spent storing memories (benchmarks report it apart from the training steps)
        self.end_task_seconds = 0.0
        #: the last replay loss (detached), ``None`` before the first replayed step
        self.last_replay_loss: Tensor | None = None
        self._flat: tuple[Tensor, ...] | None = None  # the memory concatenated, on the module's device
        self._batch_size: int | None = None
        self._batch_idx = 0
        self._init_lifecycle()

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        return self._generate_state_key(suffix=self._suffix)

    def _ckpt_key(self) -> str:
        return f"replay/{self.state_key}"

    def check_conflicts(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        """Replay holds no posterior: it shares a Trainer with any posterior callback."""

    def open_task(self, pl_module: nn.Module) -> None:
        """Nothing to prepare: the memory of the new task is taken when it ends."""

    # ------------------------------------------------------------------ the memory
    def __len__(self) -> int:
        """Examples in the memory (all tasks)."""
        return sum(len(m[0]) for m in self.memory.values())

    def add_task_data(self, data: Dataset | Any, task: int | None = None) -> tuple[Tensor, ...]:
        """Store ``memory_per_task`` examples of a task's training data (what the end of a task's fit does).

        Args:
            data: a map-style dataset with a length (items ``(x, y)`` or ``(x, y, task_id)``), or else an iterable
                of such batches (a DataLoader over an ``IterableDataset``), sampled in one pass (reservoir).
            task: the task index (default: ``tasks_seen``); its memory is replaced if it has one.

        Returns:
            The stored tensors ``(x, y[, task_id])``.
        """
        t = self.tasks_seen if task is None else check_positive_int(task, "task", allow_zero=True)
        g = torch.Generator().manual_seed(mix(self.seed, t))
        try:
            n = len(data)  # type: ignore[arg-type]
            indexable = callable(getattr(data, "__getitem__", None)) and not isinstance(data, IterableDataset)
        except TypeError:
            n, indexable = None, False
        if n is not None and indexable:
            if n == 0:
                raise ValueError(f"the training data of task {t} is empty: there is nothing to store for replay.")
            if n < self.memory_per_task:
                self._warn_once(f"small-{t}", f"task {t} has {n} training examples, fewer than "
                                              f"memory_per_task={self.memory_per_task}: all are stored.")
            idx = torch.randperm(n, generator=g)[: self.memory_per_task].sort().values
            stored = stack_dataset(data, idx)
        else:
            stored = _reservoir(data, self.memory_per_task, g)
        if len(stored) not in (2, 3):
            raise ValueError(f"items of task {t} have {len(stored)} fields; replay needs (x, y) or (x, y, task_id).")
        if self.memory and len(next(iter(self.memory.values()))) != len(stored):
            raise ValueError("tasks store items of different lengths ((x, y) and (x, y, task_id)); use one batch "
                             "convention for the whole stream.")
        self.memory[t] = tuple(s.detach().cpu().clone() for s in stored)
        self._flat = None
        return self.memory[t]

    def forget(self, task: int) -> tuple[Tensor, ...]:
        """Drop a task's memory (it is replayed no more); returns what was stored."""
        if task not in self.memory:
            raise KeyError(f"task {task!r} has no memory; stored: {sorted(self.memory)}.")
        self._flat = None
        return self.memory.pop(task)

    def reset(self) -> None:
        """Forget everything: the next fit is task 0 with an empty memory."""
        self.memory, self._flat, self.tasks_seen = {}, None, 0
        self.task_open, self.task_steps = False, 0

    def end_task(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> None:
        """Commit the open task: store its memory from the fit's training data and count it."""
        self.check_manual_commit(trainer)
        t0 = time.perf_counter()
        loader = None if trainer is None else trainer.train_dataloader
        if loader is None or isinstance(loader, (list, tuple, dict)):
            raise ValueError("end_task stores the memory from the fit's one training DataLoader; this fit has "
                             f"{type(loader).__name__}. Call add_task_data(dataset) yourself instead.")
        _check_ddp_data(loader)
        data = getattr(loader, "dataset", None)  # under DDP: the whole task, not this rank's shard
        self.add_task_data(data if _map_style(data) else loader, self.tasks_seen)  # else: one pass, reservoir
        self.tasks_seen += 1
        self.task_open, self.task_steps = False, 0
        self.end_task_seconds += time.perf_counter() - t0

    def replay_batch(self, step: int | None = None, task: int | None = None,
                     device: torch.device | str | None = None) -> tuple[Tensor, ...] | None:
        """The replay minibatch of optimizer step ``step`` of task ``task`` (default: the current ones).

        Drawn uniformly without replacement from the memory of every stored task, from ``(seed, task, step)``
        only. Returns ``(x, y[, task_id])`` on ``device`` (default: the CPU), or ``None`` while the memory is empty.
        """
        if not self.memory:
            return None
        step = self.task_steps if step is None else step
        task = self.tasks_seen if task is None else task
        device = torch.device("cpu") if device is None else torch.device(device)
        if self._flat is None or self._flat[0].device != device:
            parts = [self.memory[t] for t in sorted(self.memory)]
            self._flat = tuple(torch.cat([p[k] for p in parts]).to(device) for k in range(len(parts[0])))
        n = len(self._flat[0])
        size = min(n, self.replay_batch_size or self._batch_size or n)
        g = torch.Generator().manual_seed(mix(self.seed, task, step, 1))
        idx = torch.randperm(n, generator=g)[:size].to(device)
        return tuple(f[idx] for f in self._flat)

    # ------------------------------------------------------------------ the replay term
    def replay_loss(self, pl_module: pl.LightningModule, batch: tuple[Tensor, ...]) -> Tensor:
        """The module's loss on a replay batch (see ``loss``)."""
        if self.loss == "training_step":
            with _muted_logging(pl_module):
                out = pl_module.training_step(batch, self._batch_idx)
            if isinstance(out, dict):
                out = out.get("loss")
            if not isinstance(out, Tensor):
                raise ValueError(f"loss='training_step': {type(pl_module).__name__}.training_step returned "
                                 f"{type(out).__name__}, not a loss tensor (or a dict with 'loss'); pass "
                                 "loss='cross_entropy' or a callable (logits, y) -> loss.")
            return out
        inputs, y = split_batch(batch)
        logits = pl_module(*inputs)
        return F.cross_entropy(logits, y) if self.loss == "cross_entropy" else self.loss(logits, y)

    def add_replay_grad(self, pl_module: pl.LightningModule, params: list[nn.Parameter]) -> Tensor | None:
        """``p.grad += ∇_p replay_loss`` for ``params``, on this step's replay batch; returns the loss (or ``None``
        while the memory is empty)."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return None
        ref = params[0]
        batch = self.replay_batch(device=ref.device)
        if batch is None:
            return None
        inputs, y = split_batch(batch)
        inputs, y = move_inputs(inputs, y, ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        with torch.enable_grad():
            loss = self.replay_loss(pl_module, (*inputs[:1], y, *inputs[1:]))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)
        self.last_replay_loss = loss.detach()
        return self.last_replay_loss

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.loss == "training_step" and not pl_module.automatic_optimization:
            raise ValueError("loss='training_step' would step the optimizers inside the replay step of a module "
                             "with manual optimization; pass loss='cross_entropy' or a callable (logits, y) -> loss.")
        if stage == "fit":
            check_launcher(trainer, type(self).__name__)
        self.spawn_setup()  # under ddp_spawn the memory comes back to this process (bayescl.lightning.spawn)
        self.lifecycle_setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(trainer.train_dataloader, (list, tuple, dict)):  # those are refused by end_task
            _check_ddp_data(trainer.train_dataloader)
        self._batch_size = getattr(trainer.train_dataloader, "batch_size", None)  # one rank's under DDP
        self._flat = None
        self.lifecycle_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_idx = batch_idx
        if self._batch_size is None:
            self._batch_size = len(split_batch(batch)[1])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        opt = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps the torch one
        self.add_replay_grad(pl_module, [p for group in opt.param_groups for p in group["params"]])
        self.count_step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.auto_commit(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lifecycle_fit_end(trainer, pl_module)
        self.spawn_fit_end(trainer.global_rank)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.lifecycle_exception(trainer, exception)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**self.lifecycle_state(), "memory_per_task": self.memory_per_task, "seed": self.seed,
                "memory_tasks": sorted(self.memory)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_lifecycle_state(state_dict)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[self._ckpt_key()] = {int(t): list(m) for t, m in self.memory.items()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(self._ckpt_key())
        if saved is None:
            if self.state_key in checkpoint.get("callbacks", {}):
                raise ValueError(f"the checkpoint has the state of {self.state_key} but not its memory "
                                 f"{self._ckpt_key()!r}; it was not written by this callback.")
            return
        self.memory = {int(t): tuple(m) for t, m in saved.items()}
        self._flat = None
        self.start_from_checkpoint(checkpoint)
