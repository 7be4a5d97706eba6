"""Checkpoint state of :class:`~bayescl.lightning.vcl.VCLCallback`.

Besides the posterior server (saved by :class:`~bayescl.lightning.base.PosteriorCallback`), a checkpoint holds
which logical parameters its steps have touched, and the coresets (tensors, under
``<key>/coresets``). The layers' parameters are in the module's own ``state_dict``, so resuming mid-task with
``ckpt_path`` continues the task without re-initialising the layers.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch import Tensor


class VCLCheckpointMixin:
    """``state_dict`` / checkpoint hooks of :class:`~bayescl.lightning.vcl.VCLCallback` (uses its ``_touched``
    and ``coresets``)."""

    _touched: set[str]
    coresets: dict[int, tuple[Tensor, ...]]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "touched": sorted(self._touched),
                "coreset_tasks": sorted(self.coresets)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._touched = set(state_dict.get("touched", []))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        checkpoint[f"{self._ckpt_key()}/coresets"] = {int(t): list(c) for t, c in self.coresets.items()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        cores = checkpoint.get(f"{self._ckpt_key()}/coresets")
        if cores is not None:  # the saved coresets, and those prepared in this process for tasks they lack
            loaded = {int(t): tuple(c) for t, c in cores.items()}
            self.coresets = {**loaded, **{t: c for t, c in self.coresets.items() if t not in loaded}}
