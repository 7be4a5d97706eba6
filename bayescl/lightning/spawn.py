"""Bring a callback's state back from ``strategy="ddp_spawn"``'s worker processes.

With ``ddp_spawn`` Lightning pickles the Trainer (callbacks included) into new processes, fits there, and brings
back to the calling process only the LightningModule's weights (and ``callback_metrics``). A posterior built in
the workers would be lost: the callback in the calling process would still hold the posterior it had before
``fit``, silently.

:class:`SpawnHandoff` closes that gap with a file, the way Lightning itself brings the weights back:

1. When the calling process pickles the callback (``__getstate__``, the start of ``ddp_spawn``), it names a fresh
   file under the temporary directory and keeps the name (``_spawn_box``).
2. In the workers, :meth:`SpawnHandoff.spawn_setup` moves that name aside (``_spawn_return``), and at the end of
   a successful fit rank 0 writes the callback's state there (:meth:`SpawnHandoff.spawn_fit_end`; written to a
   temporary name and renamed, so a half-written file is never read). All ranks hold the same posterior under DDP,
   so rank 0's is everyone's.
3. In the calling process, the first access to any public attribute or method after ``fit`` returns
   (``cb.server``, ``cb.posterior()``, ``cb.tasks_seen``, the next ``fit``…) loads that file into the callback and
   deletes it. A fit that failed in the workers writes nothing: the callback keeps the posterior it had (and stops
   looking for the file).

``ddp_fork`` / ``ddp_notebook`` copy the process without pickling, so no file can be named in advance: the
callbacks refuse them (:func:`check_launcher`) with the alternatives. In one process, and under ``ddp`` (every
rank runs the user's script and builds its own callback), none of this does anything.
"""

from __future__ import annotations

import io
import os
import tempfile
import uuid
from typing import Any

import torch

#: attributes that belong to one process and one fit (references into that process's module, caches): neither
#: pickled nor handed back, and reset to these values in a copy
TRANSIENT = {"_fit_params": None, "_grad_cache": None, "_batchnorm_layers": list}
SPAWN_KEYS = frozenset({"_spawn_box", "_spawn_owner", "_spawn_return"})


def _fresh_transients() -> dict[str, Any]:
    return {k: v() if callable(v) else v for k, v in TRANSIENT.items()}


def check_launcher(trainer: Any, owner: str) -> None:
    """``ValueError`` for a fork-based multiprocessing launcher (``ddp_fork``, ``ddp_notebook``).

    Args:
        trainer: the Trainer being set up (``None``: nothing to check).
        owner: the callback's class name, for the message.
    """
    if trainer is None:  # set up by hand, outside a Trainer
        return
    launcher = getattr(trainer.strategy, "launcher", None)
    if trainer.world_size > 1 and launcher is not None and launcher.is_interactive_compatible:
        raise ValueError(f"{owner} does not support a fork-based strategy (ddp_fork / ddp_notebook): the forked "
                         "workers' posterior cannot be brought back to this process. Use strategy='ddp' (or "
                         "'ddp_spawn'; from a notebook, run the script with strategy='ddp').")


class SpawnHandoff:
    """Mixin for callbacks whose state must survive ``ddp_spawn`` (see the module docstring)."""

    _spawn_box: str | None = None
    _spawn_owner: int | None = None
    _spawn_return: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Lightning pickles the Trainer once per worker: every copy must name the same file
        self._collect_spawned(keep_pending=True)
        if self.__dict__.get("_spawn_box") is None or self.__dict__.get("_spawn_owner") != os.getpid():
            self._spawn_box = os.path.join(tempfile.gettempdir(), f"bayescl-spawn-{os.getpid()}-{uuid.uuid4().hex}.pt")
            self._spawn_owner = os.getpid()
        # the state travels as torch.save bytes: torch's multiprocessing pickler would put every tensor in shared
        # memory, which fails for empty tensors and is not wanted for a copy anyway
        buffer = io.BytesIO()
        torch.save({k: v for k, v in self.__dict__.items() if k not in TRANSIENT}, buffer)
        return {"bayescl_state": buffer.getvalue()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(torch.load(io.BytesIO(state["bayescl_state"]), weights_only=False))
        self.__dict__.update(_fresh_transients())

    def __getattribute__(self, name: str) -> Any:
        if name[0] != "_" and object.__getattribute__(self, "_spawn_box") is not None:
            object.__getattribute__(self, "_collect_spawned")()
        return object.__getattribute__(self, name)

    def _collect_spawned(self, keep_pending: bool = False) -> None:
        """In the process that pickled the callback: load the state a ``ddp_spawn`` worker left, if any (with
        ``keep_pending``, a file not written yet stays awaited)."""
        box = self.__dict__.get("_spawn_box")
        if box is None or self.__dict__.get("_spawn_owner") != os.getpid():
            return
        if not os.path.exists(box):  # the workers' fit failed (or this was a copy): keep the state as it is
            if not keep_pending:
                self.__dict__["_spawn_box"] = None
            return
        state = torch.load(box, weights_only=False)
        os.remove(box)
        self.__dict__.update(state)
        self.__dict__.update(_fresh_transients(), _spawn_box=None)

    def in_spawned_worker(self) -> bool:
        """Whether this is a copy of the callback inside a ``ddp_spawn`` worker process."""
        owner = self.__dict__.get("_spawn_owner")
        return owner is not None and owner != os.getpid()

    def spawn_setup(self) -> None:
        """In a ``ddp_spawn`` worker: keep the file name to write to, and stop looking for one to read."""
        if self.in_spawned_worker() and self.__dict__.get("_spawn_box") is not None:
            self.__dict__.update(_spawn_return=self.__dict__["_spawn_box"], _spawn_box=None)

    def spawn_fit_end(self, global_rank: int) -> None:
        """In a ``ddp_spawn`` worker, rank 0, after a fit: write the state for the calling process."""
        path = self.__dict__.get("_spawn_return")
        if path is None or global_rank != 0:
            return
        state = {k: v for k, v in self.__dict__.items() if k not in TRANSIENT and k not in SPAWN_KEYS}
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)
