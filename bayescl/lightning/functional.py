r"""A function-space prior for an existing Lightning Trainer: FROMP (Pan et al. 2020) on the package's Laplace
posterior.

:class:`FunctionalPriorCallback` **is** a :class:`~bayescl.lightning.laplace.LaplaceCallback` (it reuses its
curvature pass, posterior server and task lifecycle: same ``structure``, ``fisher``, ``prior_precision``, ``lam``)
whose weight-space prior term is replaced by a prior on functions (:mod:`bayescl.methods.functional`):

* **End of task t** (``end_task``, at the end of every ``fit`` by default): the Laplace site is added as by
  ``LaplaceCallback``, giving the weight posterior :math:`\mathcal N(\theta_t^*, \Sigma_t)`; then ``memory_size``
  memorable points of the task's training data are chosen (``selection``), and the function site
  :math:`(M_t, m_t, K_t)` is stored: :math:`m_t` the outputs at the end of the task, :math:`K_{t,c} = J_c \Sigma_t
  J_c^\top` per output (Cholesky factor cached).
* **While a later task trains**, in ``on_before_optimizer_step`` (once per optimizer step, after AMP unscaling,
  before clipping; the mechanism of :mod:`bayescl.lightning.base`), the gradient of
  :math:`\frac{\tau}{N_t} R(\theta)` is added to ``.grad``: one forward/backward through the stored points (the
  model in ``eval()`` mode, so dropout and BatchNorm statistics do not move), ``points_per_step`` of them at most.
  :math:`\tau = 1` is the Bayesian weight of the past tasks' GP against the :math:`N_t` examples of the batch-mean
  loss; FROMP's code weighs :math:`R` by :math:`\tau_{\rm FROMP}` against the batch mean, i.e.
  :math:`\tau = N_t\,\tau_{\rm FROMP}`.
* ``weight_prior=True`` adds the weight-space Laplace term as well (FROMP + online Laplace); off by default
  (FROMP regularises functions only).

Sites are per task (``task-<index>``): :meth:`FunctionalPriorCallback.forget` drops a task's points and term, and
its weight-space site (kernels already computed for later tasks keep what they saw). Checkpoints hold the server and
the function sites (``<key>/functional``); the points drawn in a step come from a generator seeded by the
callback's ``seed``, the task and a step counter that is checkpointed too, so a resumed fit draws the same points.

**Under DDP** (``strategy="ddp"``) every rank must hold the same function sites, or the functional gradient would
differ between ranks after DDP has averaged the task gradients, the weights would drift apart and a checkpoint
written by rank 0 would not describe the others:

* the weight posterior :math:`\Sigma_t` is the same on every rank (:class:`LaplaceCallback` all-reduces the
  curvature, :mod:`bayescl.lightning.distributed`);
* the memorable points are chosen from the **whole task**: the training loader's ``dataset`` (not this rank's
  ``DistributedSampler`` shard), one unshuffled pass on every rank, with the same seed, so the choice is the one
  process would make;
* the site is then **rank 0's**, bit for bit: points, outputs and kernel are summed over the ranks with zeros from
  every other rank (:func:`~bayescl.lightning.distributed.sum_across_ranks`, once per task, a few kilobytes). Each
  rank computes the same numbers anyway; the collective makes the site identical even where a rank's last bits
  differ (non-deterministic GPU kernels), which would otherwise pick *different* points (a discrete choice) and
  split the ranks' objectives;
* each step draws the same ``points_per_step`` points on every rank (seeded by ``(seed, task, step)``, no rank),
  so every rank adds the same :math:`\frac{\tau}{N_t}\nabla R` to DDP's averaged gradient, with the global
  :math:`N_t`. That gradient is recomputed on every rank: bit-identical given deterministic kernels (CPU; on a GPU
  ``torch.use_deterministic_algorithms(True)``).

In one process the collective is the identity: the sites are exactly those computed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bayescl._checks import as_enum, check_positive_int, check_real
from bayescl._params import eval_mode
from bayescl.gaussian import Gaussian
from bayescl.gaussian.prior_gradient import add_scaled_grads
from bayescl.lightning.distributed import is_distributed, rank_and_world, sum_across_ranks
from bayescl.lightning.laplace import LaplaceCallback
from bayescl.lightning.structure import Structure
from bayescl.lightning.vcl_noise import mix
from bayescl.methods.functional import (
    FunctionalSite,
    FunctionOutput,
    MemorySelection,
    SiteStack,
    collect,
    function_kernel,
    functional_prior,
    select_memorable,
    stack_sites,
)

__all__ = ["FunctionalPriorCallback"]


def rank0_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Rank 0's ``tensors`` on every rank, bit for bit: summed over the ranks with zeros from the others
    (:math:`x + 0 = x` exactly). Every rank passes tensors of the same shapes and dtypes; the identity in one
    process."""
    if not is_distributed():
        return list(tensors)
    first = rank_and_world()[0] == 0
    return sum_across_ranks([t.detach() if first else torch.zeros_like(t) for t in tensors])


class FunctionalPriorCallback(LaplaceCallback):
    r"""FROMP: a Gaussian-process prior on the network's outputs at memorable points of every past task.

    Args:
        memory_size: memorable points kept per task (FROMP: 40 for split MNIST, 200 for permuted MNIST).
        selection: ``"random"`` (uniform over the task, seeded; the default), ``"hessian"`` (FROMP's
            :math:`\sum_c p_c(1-p_c)`, largest first, balanced over labels) or ``"kcenter"``. Random is the default
            because validation data chose it where it matters most (``benchmarks/results/function-space-tuned``):
            split-MNIST class-IL 91.56 against at best 74.75 for the Hessian and 80.33 for k-center, split
            Fashion class-IL 73.02 against 46.77, domain-IL 95.42 against 90.16 (200 points per task); task-IL
            98.84 against 98.81 (40 points). Permuted MNIST prefers the Hessian (93.79 against 87.60, all 10
            tasks). The Hessian score picks the least confident inputs, near the old task's boundaries, which
            leaves the bulk of each old class unheld when new classes compete for the same outputs.
        tau: weight of the functional term, added to the gradients as :math:`\frac{\tau}{N_t}\nabla R`
            (1 = Bayesian; see the module docstring for FROMP's convention).
        output: ``"softmax"`` (FROMP) or ``"logits"``: the function the prior is on.
        points_per_step: stored points evaluated per optimizer step, shared equally by the past tasks (at least one
            each); ``None`` evaluates all of them (exact, cost grows with the memory).
        jitter: variance added to each kernel's diagonal (an observation noise on the function; it bounds each
            point's precision by ``1 / jitter``). Raise it (or lower ``tau``) when each new task learns less than
            the last: on split Fashion-MNIST class-IL validation picks ``1e-2`` (docs/defaults.md).
        weight_prior: also add the weight-space Laplace term of :class:`LaplaceCallback`.
        selection_batch_size: batch size of the passes over the task's data (scores, selection).
        structure, fisher, prior_precision, lam, normalize, gamma, online, rank, rank_diagonal, params, mc_samples,
            dataloader, curvature_batch_size, max_batches, auto_end_task, seed, state_key_suffix, num_examples,
            batchnorm, predictive_prior_precision: the weight posterior, as for :class:`LaplaceCallback`, except that
            ``fisher`` defaults to ``"exact"`` (the GGN FROMP uses), ``lam`` to 1 and ``normalize`` to ``False``: the
            kernels ``J Σ Jᵀ`` come from the Bayesian posterior. ``dataloader`` also supplies the memorable points.

    Raises:
        ValueError, TypeError: an argument out of range (the message names it and what is allowed).
    """

    prefix = "bayescl-fromp"

    def __init__(
        self,
        memory_size: int = 40,
        selection: str | MemorySelection = MemorySelection.RANDOM,
        tau: float = 1.0,
        output: str | FunctionOutput = FunctionOutput.SOFTMAX,
        points_per_step: int | None = 64,
        jitter: float = 1e-4,
        weight_prior: bool = False,
        selection_batch_size: int = 256,
        structure: str | Structure = Structure.DIAG,
        fisher: str = "exact",
        prior_precision: float = 1e-4,
        lam: float = 1.0,
        normalize: bool = False,
        gamma: float = 1.0,
        online: bool = False,
        rank: int | None = None,
        rank_diagonal: bool = False,
        params: Sequence[str] | None = None,
        mc_samples: int = 1,
        dataloader: Iterable[Any] | None = None,
        curvature_batch_size: int | None = None,
        max_batches: int | None = None,
        auto_end_task: bool = True,
        seed: int = 0,
        state_key_suffix: str = "",
        num_examples: int | None = None,
        batchnorm: str = "freeze",
        predictive_prior_precision: float | str = "marglik",
    ) -> None:
        super().__init__(structure=structure, fisher=fisher, prior_precision=prior_precision, lam=lam,
                         normalize=normalize, gamma=gamma, online=online, rank=rank, rank_diagonal=rank_diagonal,
                         params=params, mc_samples=mc_samples, dataloader=dataloader,
                         curvature_batch_size=curvature_batch_size, max_batches=max_batches,
                         auto_end_task=auto_end_task, predictive_prior_precision=predictive_prior_precision, seed=seed,
                         state_key_suffix=state_key_suffix, num_examples=num_examples, batchnorm=batchnorm)
        self.memory_size = check_positive_int(memory_size, "memory_size")
        self.selection = as_enum(MemorySelection, selection, "selection")
        self.tau = check_real(tau, "tau", low=0.0, low_open=True)
        self.output = as_enum(FunctionOutput, output, "output")
        self.points_per_step = None if points_per_step is None else check_positive_int(points_per_step,
                                                                                      "points_per_step")
        self.jitter = check_real(jitter, "jitter", low=0.0, low_open=True)
        self.weight_prior = bool(weight_prior)
        self.selection_batch_size = check_positive_int(selection_batch_size, "selection_batch_size")
        #: the function sites, by name (``task-<index>``), in task order
        self.sites: dict[str, FunctionalSite] = {}
        #: calls of :meth:`add_prior_grad` that drew points (seeds the draws; checkpointed)
        self.draws = 0
        #: the last functional term computed (a float, for logging)
        self.last_term: float | None = None
        self._device_sites: tuple[Any, list[FunctionalSite]] | None = None

    # ------------------------------------------------------------------ task end: weight site, then function site
    def _memory_data(self, trainer: pl.Trainer | None, dataloader: Iterable[Any] | None) -> Iterable[Any]:
        data = dataloader if dataloader is not None else self.dataloader
        if data is None and trainer is not None:
            data = trainer.train_dataloader
        if data is None:
            raise ValueError("end_task needs a dataloader (none given and the trainer has no train_dataloader).")
        # one unshuffled pass over the dataset: the choice does not depend on the epoch's order, and under DDP it
        # sees the whole task (the dataset), not this rank's DistributedSampler shard
        if isinstance(data, DataLoader):
            return DataLoader(data.dataset, batch_size=self.selection_batch_size, shuffle=False,
                              collate_fn=data.collate_fn)
        return data

    def function_site(self, pl_module: nn.Module, data: Iterable[Any], posterior: Gaussian | None = None,
                      task: int | None = None) -> FunctionalSite:
        """The function site of a task from its data at the current weights: memorable points, outputs, kernel.

        Args:
            pl_module: the model at the task's optimum.
            data: the task's batches (``(x, y)`` or ``(x, y, task_id)``); under DDP the whole task on every
                rank (the returned site is rank 0's on every rank).
            posterior: the weight posterior whose covariance makes the kernel (default: the current one).
            task: seeds ``"random"`` selection (default: the index of the task being closed).
        """
        q = self.posterior() if posterior is None else posterior
        inputs, y, score = collect(pl_module, data)
        g = torch.Generator().manual_seed(mix(self.seed, self.tasks_seen if task is None else task, 7))
        idx = select_memorable(inputs[0], y, score, self.memory_size, self.selection, g).to(inputs[0].device)
        points = tuple(t[idx] for t in inputs)
        mean, kernel = function_kernel(pl_module, q, points, self.output)
        *points, mean, kernel = rank0_tensors([*points, mean, kernel])  # under DDP: one site on every rank
        return FunctionalSite(tuple(t.detach().cpu() for t in points), mean.cpu(), kernel.cpu(), self.jitter)

    def end_task(self, trainer: pl.Trainer | None, pl_module: nn.Module, dataloader: Iterable[Any] | None = None,
                 name: str | None = None) -> Gaussian:
        """Close a task: the Laplace site (:meth:`LaplaceCallback.end_task`), then the task's function site.

        Returns:
            The new weight posterior.

        Raises:
            ValueError: as :meth:`LaplaceCallback.end_task`; ``memory_size`` not smaller than the task.
        """
        key = name or f"task-{self.tasks_seen}"
        data = self._memory_data(trainer, dataloader)
        n = len(data.dataset) if isinstance(data, DataLoader) else None  # type: ignore[arg-type]
        if n is not None and self.memory_size >= n:
            raise ValueError(f"memory_size={self.memory_size} is too large for a task of {n} examples; it must be "
                             "smaller.")
        q = super().end_task(trainer, pl_module, dataloader, name)
        t0 = time.perf_counter()
        try:
            with torch.enable_grad(), torch.inference_mode(False):
                self.sites[key] = self.function_site(pl_module, data, q, task=self.tasks_seen - 1)
        except Exception:  # the task is not committed: its weight site goes too (one site per task)
            if not self.online and self.server is not None and key in self.server:
                self.server.remove(key)
                self.tasks_seen -= 1
                self._grad_cache = None
            raise
        self.end_task_seconds += time.perf_counter() - t0
        self._device_sites = None
        return q

    # ------------------------------------------------------------------ the prior term
    def _stacks_on(self, ref: Tensor) -> list[SiteStack]:
        """The sites on the parameters' device and dtype, stacked once per set of sites (factors cached)."""
        key = (ref.device, ref.dtype, tuple(self.sites))
        if self._device_sites is None or self._device_sites[0] != key:
            self._device_sites = (key, stack_sites([s.to(ref.device, ref.dtype) for s in self.sites.values()]))
        return self._device_sites[1]

    def functional_term(self, pl_module: nn.Module, step: int | None = None) -> Tensor:
        r""":math:`R(\theta)` at the current weights over the points drawn for ``step`` (differentiable; the model
        in eval mode). ``step`` defaults to the current draw counter."""
        params = self._fit_params if self._fit_params is not None else self.selected_params(pl_module)
        stacks = self._stacks_on(next(iter(params.values())))
        step = self.draws if step is None else step
        g = torch.Generator().manual_seed(mix(self.seed, self.tasks_seen, step, 11))
        with eval_mode(pl_module):
            return functional_prior(pl_module, stacks, self.output, self.points_per_step, g)

    def add_prior_grad(self, pl_module: nn.Module, only: set[int] | None = None) -> None:
        r"""``p.grad += (τ / N_t) ∇R(θ)`` for the selected parameters (and the Laplace term with
        ``weight_prior``); the one mechanism of :mod:`bayescl.lightning.base`, also driven by the Avalanche plugin."""
        if self.weight_prior:
            super().add_prior_grad(pl_module, only)
        if not self.sites:
            return
        params = self.step_params(pl_module, only)
        if params is None:
            return
        with torch.enable_grad(), torch.inference_mode(False):
            term = self.functional_term(pl_module)
            grads = torch.autograd.grad(term, list(params.values()), allow_unused=True)
        self.draws += 1
        self.last_term = float(term.detach())
        used = {n: p for (n, p), g in zip(params.items(), grads) if g is not None}
        add_scaled_grads(used, {n: g for n, g in zip(params, grads) if g is not None},
                         self.tau * self.prior_term_scale())

    def penalty(self, pl_module: nn.Module) -> Tensor:
        """The functional term ``τ R(θ) / N_t`` over the points of the next draw (for logging)."""
        if not self.sites:
            return torch.zeros(())
        with torch.no_grad():
            return self.functional_term(pl_module) * (self.tau * self.prior_term_scale())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.last_term is None or trainer.logger is None:
            return
        if (trainer.global_step % max(1, trainer.log_every_n_steps)) == 0:
            pl_module.log("fromp/term", self.last_term * self.tau * self.prior_term_scale(), on_step=True,
                          on_epoch=False)

    # ------------------------------------------------------------------ sites: forget and reset
    def forget(self, task: int | str) -> FunctionalSite:
        """Drop a task's function site (its points and term) and its weight-space site; returns the function site.

        Raises:
            KeyError: no such task.
        """
        name = task if isinstance(task, str) else f"task-{task}"
        if name not in self.sites:
            raise KeyError(f"task {task!r} has no function site; known: {sorted(self.sites)}.")
        site = self.sites.pop(name)
        if self.server is not None and name in self.server:
            self.server.remove(name)
            self._grad_cache = None
        self._device_sites = None
        return site

    def reset(self) -> None:
        super().reset()
        self.sites, self.draws, self.last_term, self._device_sites = {}, 0, None, None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "function_sites": list(self.sites), "draws": self.draws,
                "memory_size": self.memory_size, "output": self.output.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.draws = int(state_dict.get("draws", 0))
        for key in ("memory_size", "output"):
            mine = self.state_dict()[key]
            if key in state_dict and state_dict[key] != mine:
                raise ValueError(f"the checkpoint was written with {key}={state_dict[key]!r}, this callback has "
                                 f"{key}={mine!r}; resume with the settings that wrote it.")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        checkpoint[f"{self._ckpt_key()}/functional"] = {k: s.state_dict() for k, s in self.sites.items()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        saved = checkpoint.get(f"{self._ckpt_key()}/functional")
        if saved is not None:
            self.sites = {k: FunctionalSite.from_state_dict(s) for k, s in saved.items()}
            self._device_sites = None
