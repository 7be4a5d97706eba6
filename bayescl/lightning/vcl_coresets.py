"""Coresets of :class:`~bayescl.lightning.vcl.VCLCallback`: held out of each task, fine-tuned on before prediction.

As in VCL (Nguyen et al. 2018), a coreset of ``coreset_size`` examples (random or k-center,
:mod:`bayescl.methods.coresets`) is taken out of each task's training data. Before ``trainer.test`` / ``trainer.predict``
the variational parameters are backed up and fine-tuned on the coresets (the union, or with
``coreset_per_task=True`` each test batch's own task), by Adam on the module's loss plus ``KL(q || q̃)/|C|`` to the
pre-coreset posterior ``q̃``; the fine-tuned copy predicts and is then discarded (:meth:`restore_pre_coreset`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from bayescl._batches import move_inputs, split_batch
from bayescl.methods.coresets import split_coreset, stack_dataset
from bayescl.methods.variational import layer_posterior, set_stochastic, tiled
from bayescl.methods.variational_predictive import raw_samples


class CoresetMixin:
    """The coreset half of :class:`~bayescl.lightning.vcl.VCLCallback` (uses its attributes: ``coreset_size``,
    ``coreset_method``, ``coreset_epochs``, ``coreset_batch_size``, ``coreset_lr``, ``coreset_per_task``,
    ``coresets``, ``train_samples``, ``seed``, ``tasks_seen`` and its layer and KL methods)."""

    coresets: dict[int, tuple[Tensor, ...]]
    _backup: dict[str, Tensor] | None
    _finetuned_for: int | str | None

    def prepare_task_data(self, dataset: Dataset, task: int | None = None) -> Dataset:
        """Hold a coreset out of a task's training data: keep it, return the rest to train on.

        ``task`` defaults to the index of the next task (``tasks_seen``, or the open one). Without a coreset
        (``coreset_size=0``) the dataset is returned unchanged. Raises ``ValueError`` if ``coreset_size`` is not
        smaller than the dataset.
        """
        if self.coreset_size == 0:
            return dataset
        t = self.tasks_seen if task is None else int(task)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        train, core = split_coreset(dataset, self.coreset_size, self.coreset_method, g)
        self.coresets[t] = tuple(x.detach().cpu().clone() for x in stack_dataset(core))
        return train

    def coreset_dataset(self, tasks: Sequence[int] | None = None) -> TensorDataset | None:
        """The union of the stored coresets, or of those of ``tasks`` (``None`` if there is none)."""
        keys = sorted(self.coresets) if tasks is None else sorted(t for t in tasks if t in self.coresets)
        if not keys:
            return None
        parts = [self.coresets[t] for t in keys]
        if len({len(p) for p in parts}) != 1:
            raise ValueError("the coresets of different tasks have items of different lengths; use one batch "
                             "convention ((x, y) or (x, y, task_id)) for the whole stream.")
        return TensorDataset(*[torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))])

    def _var_params(self, pl_module: nn.Module) -> dict[str, Tensor]:
        return {f"{path}.{k}_{s}": t for path, layer in self.layers(pl_module).items()
                for k, mu, lv in layer.variational_params() for s, t in (("mu", mu), ("logvar", lv))}

    def coreset_finetune(self, pl_module: nn.Module, tasks: Sequence[int] | None = None) -> bool:
        """Back up the variational parameters and fine-tune them on the coresets (prediction only).

        Args:
            pl_module: the module whose variational layers are fine-tuned.
            tasks: fine-tune on these tasks' coresets only (default: all of them).

        Returns ``False`` (nothing done) without coresets. :meth:`restore_pre_coreset` undoes it.
        """
        data = self.coreset_dataset(tasks)
        if data is None or self.coreset_epochs == 0 or self._backup is not None:
            return False
        with torch.inference_mode(False), torch.enable_grad():
            params = self._var_params(pl_module)
            self._backup = {n: p.detach().clone() for n, p in params.items()}
            prior = layer_posterior(pl_module, list(self.selected_params(pl_module)))
            device = next(iter(params.values())).device
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (self.tasks_seen + 1))
            loader = DataLoader(data, batch_size=self.coreset_batch_size, shuffle=True, generator=g)
            opt = torch.optim.Adam(list(params.values()), lr=self.coreset_lr)
            scale = 1.0 / len(data)
            stochastic = {p: layer.stochastic for p, layer in self.layers(pl_module).items()}
            set_stochastic(pl_module, True)
            self.seed_noise(pl_module, 2, self.tasks_seen)
            try:
                with raw_samples(pl_module):
                    for _ in range(self.coreset_epochs):
                        for batch in loader:
                            inputs, y = split_batch(batch)
                            inputs, y = move_inputs(inputs, y, device)
                            opt.zero_grad(set_to_none=True)
                            with tiled(pl_module, (inputs, y), self.train_samples) as (inputs, y):
                                self.coreset_loss(pl_module(*inputs), y).backward()
                            self._add_kl_grad(pl_module, scale, prior=prior)
                            opt.step()
            finally:
                for p in params.values():
                    p.grad = None
                for p, layer in self.layers(pl_module).items():
                    layer.stochastic = stochastic.get(p, True)
        return True

    def _coreset_tasks_of(self, task_id: int) -> list[int]:
        """The coresets whose stored task ids contain ``task_id``."""
        return [t for t, c in sorted(self.coresets.items()) if len(c) == 3 and bool((c[2] == task_id).any())]

    def _finetune_for_batch(self, pl_module: nn.Module, batch: Any) -> None:
        """``coreset_per_task``: make the layers the fine-tune on the coreset of the batch's task (cached)."""
        inputs, _ = split_batch(batch)
        if len(inputs) < 2:
            raise ValueError("coreset_per_task=True fine-tunes on the coreset of each test batch's task, so test "
                             "batches must be (x, y, task_id); got (x, y). Use coreset_per_task=False to "
                             "fine-tune once on the union of the coresets.")
        ids = torch.as_tensor(inputs[1]).reshape(-1).unique()
        key: int | str = int(ids[0]) if ids.numel() == 1 else "union"
        if key == self._finetuned_for and self._backup is not None:
            return
        self.restore_pre_coreset(pl_module)
        tasks = None if key == "union" else self._coreset_tasks_of(int(key))
        if tasks != []:  # a task without a coreset is predicted by the pre-coreset posterior
            self.coreset_finetune(pl_module, tasks)
        self._finetuned_for = key

    def restore_pre_coreset(self, pl_module: nn.Module) -> None:
        """Put back the parameters saved by :meth:`coreset_finetune` (no-op if none)."""
        self._finetuned_for = None
        if self._backup is None:
            return
        with torch.inference_mode(False), torch.no_grad():
            for n, p in self._var_params(pl_module).items():
                p.copy_(self._backup[n])
        self._backup = None
