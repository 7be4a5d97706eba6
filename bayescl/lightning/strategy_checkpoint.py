"""Checkpoints and failures of :class:`~bayescl.lightning.strategy.PosteriorServerStrategy`.

**Checkpoints.** Every Lightning checkpoint holds the server under :attr:`PosteriorServerStrategy.CHECKPOINT_KEY`:
the shared part (prior, past sites, task counter) and every rank's local state (its own site, the others' share,
the sync counters, the buffered batches of the next curvature estimate and, since every worker trains its own
weights between syncs, rank 1…W−1's weights and optimizer states), all-gathered by :meth:`save_checkpoint`
(called on every rank by ``Trainer.save_checkpoint``, as Lightning requires) and written by rank 0. A fit with
``ckpt_path`` on the same number of workers restores them in :meth:`setup` (each rank takes its own), so a killed
run resumed from a checkpoint written at an epoch boundary continues to the uninterrupted run's posterior, bit
for bit. Mid-epoch, Lightning restarts the epoch's data unless the loader is stateful.

**Failures.** A collective that fails (a worker died, failed or stalled past ``timeout``) is re-raised as a
``RuntimeError`` naming this rank, the optimizer step and the sync; with Lightning's script launcher rank 0 then kills
the worker processes it started, so that none outlives the run.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.server import PosteriorServer
from bayescl.lightning import strategy_sites as ops

__all__ = ["StrategyCheckpointMixin"]


class StrategyCheckpointMixin:
    """Saving and restoring the posterior server in Lightning checkpoints, and failing cleanly; mixed into
    :class:`~bayescl.lightning.strategy.PosteriorServerStrategy` (before ``DDPStrategy``), whose attributes it uses."""

    def server_state(self) -> dict[str, Any]:
        """This rank's view: ``{"shared": ..., "local": ...}``. ``shared`` (the same on every rank) is the server's
        ``state_dict`` without this rank's running sites, plus ``tasks_seen`` and ``world_size``; ``local`` holds the
        own site and the others' share (``None`` outside a task), the counters and the buffered batches, and on
        ranks other than 0 the module's ``state_dict`` and the optimizers' states (every worker trains its own
        weights between syncs; rank 0's are the checkpoint's ``state_dict`` and ``optimizer_states``), on CPU."""
        server = self.server
        local_keys = (self.own_key, self.others_key)
        shared: dict[str, Any] = {"tasks_seen": self.tasks_seen, "world_size": self.world, "server": None}
        local: dict[str, Any] = {"rank": int(self.global_rank), "own": None, "others": None, "module": None,
                                 "optimizers": None}
        if server is not None:
            rest = PosteriorServer(server.prior, damping=server.damping)
            for key, site in server.items():
                if key not in local_keys:
                    rest.add(key, site)
            shared["server"] = rest.state_dict()
            for name, key in (("own", self.own_key), ("others", self.others_key)):
                local[name] = server[key].state_dict() if key in server else None
        module = self.lightning_module
        if self.global_rank != 0 and module is not None:  # rank 0's are the checkpoint's own entries
            local["module"] = ops.to_cpu(module.state_dict())
            local["optimizers"] = [ops.to_cpu(self.optimizer_state(o)) for o in self.optimizers]
        local.update(num_syncs=self.num_syncs, task_syncs=self._task_syncs, steps_since_sync=self._steps_since_sync,
                     bytes_communicated=self.bytes_communicated, bytes_gathered=self.bytes_gathered,
                     last_gather_drift=self.last_gather_drift, buffer=[ops.to_cpu(b) for b in self._buffer])
        return {"shared": shared, "local": local}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Add :attr:`CHECKPOINT_KEY` (``{"shared": ..., "workers": [local state of rank 0, …, W−1]}``, see
        :meth:`server_state`) to the checkpoint, then write it from rank 0 (collective: an ``all_gather_object``;
        Lightning's ``Trainer.save_checkpoint`` runs on every rank)."""
        state = self.server_state()
        workers = ops.all_gather_object(state["local"], self.world)
        checkpoint[self.CHECKPOINT_KEY] = {"shared": state["shared"], "workers": workers}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Read the checkpoint (every rank) and keep its :attr:`CHECKPOINT_KEY` entry for :meth:`setup`, which
        restores it once the module is connected (:meth:`load_server_state`)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._resume_state, self._resume_optimizers = checkpoint.get(self.CHECKPOINT_KEY), None
        if self._resume_state is None:
            rank_zero_warn(f"the checkpoint {str(checkpoint_path)!r} holds no posterior server (written without "
                           "PosteriorServerStrategy): the weights are restored but the server starts from the prior.")
        return checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Lightning's optimizer restore, with this rank's optimizer states when the checkpoint holds them (ranks
        other than 0, see :meth:`server_state`)."""
        states, self._resume_optimizers = self._resume_optimizers, None
        if states is not None:
            checkpoint = {**checkpoint, "optimizer_states": states}
        super().load_optimizer_state_dict(checkpoint)

    def load_server_state(self, state: dict[str, Any]) -> None:
        """Restore the server, the task counter and this rank's local state (its weights now, its optimizer states
        when Lightning restores the optimizers) from a checkpoint's :attr:`CHECKPOINT_KEY` entry (``{"shared", "workers"}``, see :meth:`save_checkpoint`).

        Raises:
            ValueError: the checkpoint was written by another number of workers, or lacks this rank's state.
        """
        shared, workers = state["shared"], state["workers"]
        if int(shared["world_size"]) != self.world or len(workers) != self.world:
            raise ValueError(f"the checkpoint's posterior server was written by {len(workers)} workers but this run "
                             f"has {self.world}; resume a PosteriorServerStrategy on the same number of workers.")
        local = workers[self.global_rank]
        if int(local["rank"]) != self.global_rank:
            raise ValueError(f"the checkpoint's worker states are out of order: entry {self.global_rank} holds rank "
                             f"{local['rank']}.")
        self.tasks_seen = int(shared["tasks_seen"])
        self.server = None if shared["server"] is None else PosteriorServer.from_state_dict(shared["server"])
        if self.server is not None:
            for name, key in (("own", self.own_key), ("others", self.others_key)):
                if local[name] is not None:
                    self.server.add(key, DiagGaussian.from_state_dict(local[name]))
        self.num_syncs, self._task_syncs = int(local["num_syncs"]), int(local["task_syncs"])
        self._steps_since_sync = int(local["steps_since_sync"])
        self.bytes_communicated, self.bytes_gathered = int(local["bytes_communicated"]), int(local["bytes_gathered"])
        self.last_gather_drift = float(local["last_gather_drift"])
        if local.get("module") is not None and self.lightning_module is not None:
            self.lightning_module.load_state_dict(local["module"])  # after configure_ddp broadcast rank 0's
        self._resume_optimizers = local.get("optimizers")  # for load_optimizer_state_dict, after setup
        self._buffer.clear()
        self._buffer.extend(ops.to_device(b, self.root_device) for b in local["buffer"])
        self._prior_grad = None

    # ------------------------------------------------------------------ collectives and failures
    def _all_reduce_sum(self, vec: Tensor) -> Tensor:
        """``Σ_ranks vec`` (collective; a copy of ``vec`` without a process group)."""
        with self._collective("the all-reduce of a sync"):
            return ops.all_reduce_sum(vec, self.root_device, self.world)

    def _all_gather(self, vec: Tensor) -> list[Tensor]:
        """``[vec of rank 0, …, vec of rank W−1]`` (collective; ``[vec]`` without a process group)."""
        with self._collective("the all-gather of the sites at the end of the task"):
            return ops.all_gather(vec, self.root_device, self.world)

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Re-raise a failed collective as a ``RuntimeError`` naming this rank, the step and the sync."""
        try:
            yield
        except Exception as e:
            try:
                step: Any = self.lightning_module.trainer.global_step
            except (AttributeError, RuntimeError):  # no module, or a module outside a Trainer
                step = "?"
            raise RuntimeError(
                f"PosteriorServerStrategy: rank {self.global_rank} of {self.world}, after optimizer step {step} "
                f"(sync {self.num_syncs + 1}): {what} failed: another worker died, failed or stalled for longer than "
                f"timeout={self.collective_timeout} (its log names the cause). The run stops; resume it from the last "
                f"checkpoint. {type(e).__name__}: {e}") from e

    def on_exception(self, exception: BaseException) -> None:
        """A failed rank stops the others: with Lightning's script launcher (``start_method="popen"``), rank 0 kills
        the worker processes it started, so that a stalled one does not outlive the run (Lightning does this itself
        only for ``KeyboardInterrupt``; it kills rank 0 when a child dies). Under ``torchrun`` or SLURM their
        launcher stops the job when a rank exits with an error."""
        super().on_exception(exception)
        launcher = self.launcher
        if self.global_rank == 0 and launcher is not None and hasattr(launcher, "kill") and self.world > 1:
            launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))
