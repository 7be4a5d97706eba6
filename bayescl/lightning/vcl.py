r"""Variational continual learning (Nguyen, Li, Bui & Turner 2018) for an existing Lightning Trainer.

Adding :class:`VCLCallback` to a Trainer makes the user's model Bayesian without a rewrite:

* **Module swap.** At ``setup`` (before ``configure_optimizers``, so the optimizer sees the new parameters) every
  ``nn.Linear`` / ``nn.Conv2d`` of the LightningModule becomes a mean-field Gaussian layer
  (:mod:`bayescl.methods.variational`, local reparameterisation). ``setup`` runs at every ``fit``; the swap is
  idempotent. In ``eval()`` mode the LightningModule's call returns the log of the softmax probabilities averaged
  over ``test_samples`` samples, so a plain ``test_step`` (``argmax`` of the output) gets the MC-averaged
  prediction.
* **ELBO.** For task :math:`t` with :math:`N_t` training examples the objective per example is

  .. math::  -\frac{1}{N_t}\mathrm{ELBO} = \mathbb E_q[\ell(\theta)] + \frac{1}{N_t}\mathrm{KL}(q \,\|\, q_{t-1}).

  The user's loss (a batch mean) is the first term, one Monte Carlo sample per forward pass (``train_samples = k
  > 1`` averages it over k samples: by default one forward pass over the batch repeated k times, whose first
  variational layer computes its mean and variance once). The KL term is added through the same mechanism
  as the Laplace prior term: in ``on_before_optimizer_step`` (once per optimizer step whatever
  ``accumulate_grad_batches`` is, after AMP unscaling, before clipping) its closed-form gradient,
  :math:`\nabla_\mu = \lambda_p(\mu-\mu_p)`, :math:`\nabla_\ell = \tfrac12(\lambda_p e^{\ell} - 1)`, divided by
  :math:`N_t`, is added to the ``.grad`` of the variational parameters. The KL's value is computed (checked to be
  finite, and logged as ``vcl/kl``, its epoch mean) at the steps Lightning logs (``log_every_n_steps``) and at each
  epoch's first step; the other steps add the gradient alone.
  Only layers that receive a data gradient in the step get the KL term: a layer no task has used (the head of a
  future task) keeps its initialisation, and its posterior stays exactly the base prior.
* **Maximum-likelihood start** (``ml_init=True``, the VCL protocol): during the first task's first ``ml_epochs``
  epochs (``trainer.current_epoch < ml_epochs``) the layers use their means only, without noise and without
  KL, i.e. an ordinary ML fit that initialises the means.
* **Task end** (``on_train_end`` or :meth:`end_task`): the layers' ``q_t`` becomes the prior of the next task.
  In the posterior server the task's site is ``q_t / q_{t−1}`` (natural parameters), so ``prior × sites = q_t``.
  Where the fitted variance of a weight exceeds that of ``q_{t−1}`` the site has negative precision there (a
  *signed* site, see :mod:`bayescl.gaussian.diag`); the product stays ``q_t``. Forgetting a task whose removal would
  leave a later signed site uncovered is refused (``ValueError``, nothing changes). ``clamp_variance=True``
  instead shrinks such variances to the previous ones (non-negative sites, always forgettable; it changes
  ``q_t``, and costs accuracy: see the README). At the start of the next task the
  layers are initialised at ``q_t`` (layers with no site keep their values). Base prior ``N(0, I/prior_precision)``,
  ``N(0, 1)`` by default as in the paper; parameters that appear later get it too.
* **Coresets** (``coreset_size > 0``): :meth:`prepare_task_data` splits a task's dataset into
  ``(train_without_coreset, coreset)``, keeps the coreset and returns the rest to train on (as in the paper the
  coreset is held out). Before ``trainer.test`` / ``trainer.predict`` the variational parameters are fine-tuned on
  the union of the coresets (``coreset_epochs`` epochs of Adam, ``train_samples`` samples per step,
  cross-entropy on the module's logits plus
  ``KL(q || q̃)/|C|`` to the pre-coreset posterior ``q̃``) and used for prediction only; at the end of the test the
  pre-coreset parameters are restored, nothing is carried forward. Validation inside ``fit`` uses ``q̃``.
  ``coreset_per_task=True`` (the paper's multi-head protocol) instead fine-tunes a fresh copy of ``q̃`` on each
  task's own coreset, before the first test batch of that task (by the batch's ``task_id``).

Under Lightning DDP (``strategy="ddp"``; ``"ddp_find_unused_parameters_true"`` for a multi-head model) every rank
holds the same posterior: :math:`N_t` is the global task size (see :mod:`bayescl.lightning.base`), the KL gradient
depends only on the parameters and the prior, which are identical on every rank after DDP's gradient all-reduce,
and the task's site is computed from those parameters. The training noise is seeded per rank (the rank joins the
batch's key), so examples on different ranks do not share it. :meth:`prepare_task_data` is deterministic per
``(seed, task)``: called with the same dataset in every process (the script runs once per rank), it holds out the
same coreset on every rank.

Checkpoints hold the server (tensors), the coresets and the bookkeeping (``tasks_seen``, whether a task is open,
which layers it has touched); the layers' parameters are in the module's ``state_dict``. Resuming mid-task with
``ckpt_path`` continues the task without re-initialising the layers.

Other trainable parameters (BatchNorm, embeddings) stay point estimates without a prior term.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayescl._checks import as_enum, check_positive_int, check_real
from bayescl.gaussian import DiagGaussian, PosteriorServer
from bayescl.lightning.base import PosteriorCallback, optimizer_param_ids
from bayescl.lightning.vcl_checkpoint import VCLCheckpointMixin
from bayescl.lightning.vcl_coresets import CoresetMixin
from bayescl.lightning.vcl_kl import KLTermMixin, layer_names
from bayescl.lightning.vcl_mc_step import unwrap_training_step, wrap_training_step
from bayescl.lightning.vcl_noise import seed_layers
from bayescl.methods.coresets import CoresetMethod
from bayescl.methods.variational import (
    BayesLayer,
    convert,
    layer_posterior,
    load_posterior,
    set_stochastic,
    variational_layers,
)
from bayescl.methods.variational_init import resolve_logvar_init
from bayescl.methods.variational_predictive import enable_predictive


class VCLCallback(CoresetMixin, KLTermMixin, VCLCheckpointMixin, PosteriorCallback):
    """Variational continual learning with mean-field Gaussian weights (see the module docstring).

    Args:
        prior_precision: precision of the base prior ``N(0, I/prior_precision)`` (1: the paper's ``N(0, 1)``).
        logvar_init: initial log-variance of the swapped-in layers: a finite constant for every weight, or
            ``"fan_in"`` / ``"fan_in:<r>"``: ``log(r / (3 fan_in))`` per layer, ``r`` times the variance of PyTorch's
            default init, so the noise-to-signal ratio is the same in every layer
            (:mod:`bayescl.methods.variational_init`). The default ``"fan_in:1"`` was chosen on validation data
            (docs/defaults.md). The earlier constant −6 equals PyTorch's init variance only at a fan-in of about 134:
            it is 3.8× wider in a 512-input layer and narrower in narrower ones.
        train_samples: Monte Carlo samples of the network per training step, their losses averaged (1: one
            sample per step; local reparameterisation keeps its variance low).
        vectorize_samples: run the ``train_samples`` samples as one forward pass over the batch repeated along
            dim 0 (fast; the loss must be a mean over the batch, Lightning's convention, which the ``1/N_t`` KL
            scaling assumes anyway). ``False``: ``train_samples`` calls of ``training_step``, losses averaged.
        test_samples: samples averaged (in probability) by every eval-mode call of the module. The default 30
            gives the validation accuracy of 100 samples (within their Monte Carlo spread) and a log-loss within
            2 % of theirs, at 30 % of the cost (``benchmarks/diagnostics/vcl_test_samples.py``); 10 lost 0.1 point
            on split-MNIST task-IL.
        ml_init: start the first task with ``ml_epochs`` epochs of a deterministic maximum-likelihood fit.
        ml_epochs: epochs of that fit (counted by ``trainer.current_epoch``).
        clamp_variance: at the end of a task, shrink any fitted variance above the previous posterior's back to
            it (sites then have precision ``>= 0`` and every task can be forgotten). ``False`` (the paper): the
            fitted ``q_t`` is kept as it is and the site may be signed.
        coreset_size: examples kept per task (0: no coreset).
        coreset_method: ``"random"`` or ``"kcenter"``.
        coreset_epochs, coreset_batch_size, coreset_lr: the fine-tune on the coresets before testing.
        coreset_per_task: fine-tune a fresh copy on each task's own coreset before predicting that task's test
            batches (read from the batch's ``task_id``; the paper's multi-head protocol), instead of once on the
            union of the coresets. A batch mixing tasks gets the union; a task without a coreset the
            pre-coreset posterior.
        params: regular expressions (``re.search`` on logical names such as ``model.trunk.1.weight``) selecting
            the layers to make variational; ``None`` = every Linear/Conv2d.
        auto_end_task: close the task at the end of every ``fit`` (else call :meth:`end_task`).
        seed: seeds coreset selection and the coreset fine-tune's shuffling.
        state_key_suffix: distinguishes two instances on one Trainer.
        num_examples: :math:`N_t` for training data without a length (an ``IterableDataset``).
        batchnorm: ``"freeze"`` (BatchNorm running statistics fixed after the first task) or ``"train"``.
    """

    prefix = "bayescl-vcl"
    swaps_layers = True
    penalise_prior_alone = True

    def __init__(
        self,
        prior_precision: float = 1.0,
        logvar_init: float | str = "fan_in:1",
        train_samples: int = 1,
        test_samples: int = 30,
        vectorize_samples: bool = True,
        ml_init: bool = True,
        ml_epochs: int = 1,
        clamp_variance: bool = False,
        coreset_size: int = 0,
        coreset_method: str | CoresetMethod = CoresetMethod.RANDOM,
        coreset_epochs: int = 5,
        coreset_batch_size: int = 64,
        coreset_lr: float = 1e-3,
        coreset_per_task: bool = False,
        params: Sequence[str] | None = None,
        auto_end_task: bool = True,
        seed: int = 0,
        state_key_suffix: str = "",
        num_examples: int | None = None,
        batchnorm: str = "freeze",
    ) -> None:
        super().__init__(prior_precision=prior_precision, params=params, state_key_suffix=state_key_suffix,
                         num_examples=num_examples, batchnorm=batchnorm)
        self.logvar_init: float | str = resolve_logvar_init(logvar_init).spec()
        self.train_samples = check_positive_int(train_samples, "train_samples")
        self.test_samples = check_positive_int(test_samples, "test_samples")
        self.vectorize_samples = bool(vectorize_samples)
        self.ml_init = bool(ml_init)
        self.ml_epochs = check_positive_int(ml_epochs, "ml_epochs", allow_zero=True)
        self.clamp_variance = bool(clamp_variance)
        self.coreset_size = check_positive_int(coreset_size, "coreset_size", allow_zero=True)
        self.coreset_method = as_enum(CoresetMethod, coreset_method, "coreset_method")
        self.coreset_epochs = check_positive_int(coreset_epochs, "coreset_epochs", allow_zero=True)
        self.coreset_batch_size = check_positive_int(coreset_batch_size, "coreset_batch_size")
        self.coreset_lr = check_real(coreset_lr, "coreset_lr", low=0.0, low_open=True)
        self.coreset_per_task = bool(coreset_per_task)
        self.auto_end_task = bool(auto_end_task)
        self.seed = int(seed)
        self.coreset_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
        #: task index -> the coreset's stacked tensors ``(x, y[, task_id])`` (CPU).
        self.coresets: dict[int, tuple[Tensor, ...]] = {}
        self._touched: set[str] = set()
        self._backup: dict[str, Tensor] | None = None
        self._finetuned_for: int | str | None = None  # the task (or "union") the layers are fine-tuned for
        self._generators: dict[torch.device, torch.Generator] = {}
        self._kl_epoch_unlogged = True  # no step of this epoch has computed the KL's value yet

    # ------------------------------------------------------------------ layers and names
    def include_layer(self, path: str) -> bool:
        """Whether the layer at module path ``path`` carries a posterior (``params`` matches its weight or bias)."""
        keep = self.param_filter
        return keep is None or any(keep(f"{path}.{k}" if path else k) for k in ("weight", "bias"))

    def layers(self, pl_module: nn.Module) -> dict[str, BayesLayer]:
        """The variational layers that carry the posterior, by module path."""
        return {p: m for p, m in variational_layers(pl_module).items() if self.include_layer(p)}

    def selected_params(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """Logical name (``<path>.weight`` / ``.bias``) -> the layer's mean parameter."""
        out = {}
        for path, layer in self.layers(pl_module).items():
            for name, (_, mu, _) in zip(layer_names(path, layer), layer.variational_params()):
                out[name] = mu
        if not out:
            raise ValueError(f"VCLCallback found no variational layer in {type(pl_module).__name__}; "
                             "attach it to a Trainer (setup converts the layers) or call convert() first.")
        return out

    def make_prior(self, pl_module: nn.Module) -> DiagGaussian:
        zeros = {n: torch.zeros_like(p.detach()) for n, p in self.selected_params(pl_module).items()}
        return DiagGaussian.isotropic(zeros, self.prior_precision)

    def ensure_server(self, pl_module: nn.Module) -> PosteriorServer:
        """Create the server on first use; logical parameters that appeared since get the base prior N(0, 1/p)."""
        params = self.selected_params(pl_module)
        if self.server is None:
            self.server = PosteriorServer(self.make_prior(pl_module))
        new = {n: torch.zeros_like(p.detach()) for n, p in params.items() if n not in self.server.prior}
        if new:
            self.server.extend_prior(new, self.prior_precision)
            self._grad_cache = None
        return self.server

    def informed_names(self) -> set[str]:
        """Logical names on which some site is not empty (the data has said something about them)."""
        if self.server is None:
            return set()
        out = set()
        for name in self.server.names:
            prec, eta = self.server[name].precision, self.server[name].eta
            out |= {n for n in prec if bool(prec[n].ne(0).any()) or bool(eta[n].ne(0).any())}
        return out

    @torch.no_grad()
    def apply_posterior(self, pl_module: nn.Module, names: Sequence[str] | None = None) -> None:
        """Load the current posterior into the layers (default: on the parameters some site informs)."""
        names = sorted(self.informed_names()) if names is None else list(names)
        if names:
            load_posterior(pl_module, self.posterior(), names)

    def seed_noise(self, pl_module: nn.Module, *key: int) -> None:
        """Seed the layers' noise from ``(seed, *key)``: the same step draws the same noise, also after a resume
        (:mod:`bayescl.lightning.vcl_noise`)."""
        seed_layers(self.layers(pl_module), self._generators, self.seed, *key)

    # ------------------------------------------------------------------ task boundaries
    @torch.no_grad()
    def end_task(self, trainer: pl.Trainer | None, pl_module: nn.Module, name: str | None = None) -> DiagGaussian:
        """Close a task: the layers' ``q_t`` becomes the posterior (site ``q_t / q_{t−1}``); returns it.

        Layers no step of this task touched keep ``q_{t−1}`` (an empty site). Raises ``ValueError`` naming the
        parameter if ``q_t`` is not finite; the previous posterior is kept.
        """
        self.check_manual_commit(trainer)
        server = self.ensure_server(pl_module)
        names = list(server.prior.names)
        q_prev = server.posterior()
        q_layers = layer_posterior(pl_module, names)
        touched = self._touched
        for n in touched:
            mu, prec = q_layers.mean[n], q_layers.precision[n]
            if not (bool(torch.isfinite(mu).all()) and bool(torch.isfinite(prec).all()) and bool((prec > 0).all())):
                raise ValueError(f"the variational posterior of parameter {n!r} is not finite; the task is not "
                                 "closed and the previous posterior is kept.")
        pm, pp = q_prev.mean, q_prev.precision
        lm, lp = q_layers.mean, q_layers.precision
        mean = {n: lm[n] if n in touched else pm[n] for n in names}
        if self.clamp_variance:
            prec = {n: torch.maximum(lp[n], pp[n]) if n in touched else pp[n] for n in names}
        else:
            prec = {n: lp[n] if n in touched else pp[n] for n in names}
        q_new = DiagGaussian.from_mean_precision(mean, prec)
        site = q_new.divide(q_prev, allow_improper=True, allow_negative=not self.clamp_variance)
        server.add(name or f"task-{self.tasks_seen}", site)
        self._grad_cache = None
        informed = self.informed_names()
        self.apply_posterior(pl_module, [n for n in names if n in touched or n in informed])
        self.tasks_seen += 1
        self.task_open, self.task_steps = False, 0
        self._touched = set()
        return server.posterior()

    def forget(self, task: int | str, pl_module: nn.Module | None = None) -> DiagGaussian:
        """Remove a task's site and its coreset; with ``pl_module`` the layers are set to the new posterior."""
        site = super().forget(task)
        if isinstance(task, int):
            self.coresets.pop(task, None)
        elif task.startswith("task-") and task[5:].isdigit():
            self.coresets.pop(int(task[5:]), None)
        if pl_module is not None:
            self.apply_posterior(pl_module, list(self.server.prior.names))
        return site

    def reset(self) -> None:
        super().reset()
        self.coresets, self._touched, self._backup = {}, set(), None
        self._finetuned_for = None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.in_spawned_worker() and not variational_layers(pl_module):
            raise ValueError("VCLCallback with strategy='ddp_spawn' needs a model that is variational already: "
                             "the workers would swap its layers for variational ones, and ddp_spawn brings back only "
                             "the weights whose names exist in this process's model, so the trained means would be "
                             "lost. Call bayescl.variational.convert(model) before trainer.fit, or use "
                             "strategy='ddp'.")
        convert(pl_module, self.logvar_init, include=self.include_layer)
        enable_predictive(pl_module, self.test_samples)
        wrap_training_step(pl_module, self.train_samples, self.vectorize_samples)
        super().setup(trainer, pl_module, stage)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        unwrap_training_step(pl_module)
        self.restore_pre_coreset(pl_module)

    def open_task(self, pl_module: nn.Module) -> None:
        """A new task starts from the current posterior; its coreset must have been held out.

        Raises:
            ValueError: ``coreset_size > 0`` and :meth:`prepare_task_data` was not called for this task.
        """
        if self.coreset_size > 0 and self.tasks_seen not in self.coresets:
            raise ValueError(f"coreset_size={self.coreset_size} holds a coreset out of each task, but "
                             f"prepare_task_data was not called for task {self.tasks_seen}: train on "
                             "vcl.prepare_task_data(task_dataset) (or use coreset_size=0).")
        if self.tasks_seen > 0:
            self.apply_posterior(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_stochastic(pl_module, not self.in_ml_phase(trainer.current_epoch))
        self._kl_epoch_unlogged = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        rank = (trainer.global_rank,) if getattr(trainer, "world_size", 1) > 1 else ()  # one process: as before
        self.seed_noise(pl_module, 0, self.tasks_seen, trainer.current_epoch, batch_idx, *rank)

    def _eval_batch_start(self, pl_module: nn.Module, batch_idx: int, dataloader_idx: int) -> None:
        self.seed_noise(pl_module, 1, dataloader_idx, batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_start(pl_module, batch_idx, dataloader_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.coreset_per_task and self.coresets:
            self._finetune_for_batch(pl_module, batch)
        self._eval_batch_start(pl_module, batch_idx, dataloader_idx)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.coreset_per_task and self.coresets:
            self._finetune_for_batch(pl_module, batch)
        self._eval_batch_start(pl_module, batch_idx, dataloader_idx)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # the KL's value (logged, and checked to be finite) at the steps Lightning logs and at each epoch's first
        # step; the other steps add its gradient alone (cheaper: the value costs two more passes over the weights)
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        value = self._kl_epoch_unlogged or trainer.global_step % every == 0
        kl = self.add_prior_grad(pl_module, trainer.current_epoch, optimizer_param_ids(optimizer), value=value)
        self.count_step()
        if kl is not None:
            self._kl_epoch_unlogged = False
            pl_module.log("vcl/kl", kl, on_step=False, on_epoch=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_stochastic(pl_module, True)
        self.auto_commit(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.coreset_per_task:
            self.coreset_finetune(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore_pre_coreset(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.coreset_per_task:
            self.coreset_finetune(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore_pre_coreset(pl_module)
