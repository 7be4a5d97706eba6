"""What every bayescl callback shares: a :class:`~bayescl.gaussian.server.PosteriorServer` as its state, task
boundaries, unlearning, checkpoints, and the one mechanism that adds a prior term to the gradients.

The prior term. For task ``t`` with ``N_t`` training examples the MAP objective is
``−log p(D_t | θ) − log q_{t−1}(θ)``; divided by ``N_t`` (Lightning losses are batch means) it is

.. math::  \\ell(\\theta) + \\frac{1}{2N_t} (\\theta-\\mu)^\\top \\Lambda (\\theta-\\mu),

so after ``backward`` each gradient gets ``(Λθ − η) / N_t`` added, in ``on_before_optimizer_step``: once per
optimizer step whatever ``accumulate_grad_batches`` is, after AMP unscaling and before gradient clipping.
The user's LightningModule is never edited.

Under Lightning DDP the loss is a per-rank batch mean and DDP averages the gradients, i.e. the gradient of the
global batch mean: :math:`N_t` is the **global** task size. It is ``len`` of the training loader's dataset, which is
the whole task on every rank (Lightning's ``DistributedSampler`` only chooses each rank's indices), so no collective
is needed and the padding the sampler adds is not counted; ``num_examples`` (for an ``IterableDataset``) is the
global size too. Weights and posterior being identical on every rank, so is the prior term
(:mod:`bayescl.lightning.distributed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from bayescl._checks import as_enum, check_positive_int, check_real
from bayescl._params import param_filter, select_params
from bayescl.gaussian import Gaussian, PosteriorServer, PriorGradient
from bayescl.lightning.batchnorm import BatchNormPolicy, batchnorm_layers, freeze_running_stats
from bayescl.lightning.lifecycle import TaskLifecycle
from bayescl.lightning.spawn import SpawnHandoff, check_launcher


def _dataset_size(dataloader: Any) -> int | None:
    ds = getattr(dataloader, "dataset", None)
    try:
        return len(ds) if ds is not None else None
    except TypeError:
        return None


def optimizer_param_ids(optimizer: Any) -> set[int] | None:
    """``id`` of every parameter an optimizer steps (``None`` when ``optimizer`` is ``None``)."""
    if optimizer is None:
        return None
    opt = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps the torch one
    return {id(p) for group in opt.param_groups for p in group["params"]}


class PosteriorCallback(SpawnHandoff, TaskLifecycle, pl.Callback):
    """Base class: holds the posterior server and the task bookkeeping; subclasses say how a task ends.

    Args:
        prior_precision: precision of the isotropic zero-mean base prior ``N(0, I / prior_precision)``; also
            given to parameters that appear later (new heads).
        params: regular expressions (``re.search`` on the LightningModule's parameter names) selecting the
            parameters that carry a posterior; ``None`` = every trainable parameter.
        state_key_suffix: distinguishes two instances of the same class on one Trainer.
        num_examples: :math:`N_t` when the training data has no length (an ``IterableDataset``); with a sized
            dataset its length is used. Under DDP it is the global task size (all ranks together).
        batchnorm: ``"freeze"`` keeps BatchNorm's running statistics of the first task (from the second task on
            those layers train in eval mode); ``"train"`` lets them move (see :mod:`bayescl.lightning.batchnorm`).

    Raises:
        TypeError: ``params`` is not a list of strings.
        ValueError: ``prior_precision <= 0`` or a pattern of ``params`` is not a valid regular expression.
    """

    prefix = "bayescl"

    def __init__(self, prior_precision: float = 1e-4, params: Sequence[str] | None = None,
                 state_key_suffix: str = "", num_examples: int | None = None,
                 batchnorm: str | BatchNormPolicy = BatchNormPolicy.FREEZE) -> None:
        self.prior_precision = check_real(prior_precision, "prior_precision", low=0.0, low_open=True)
        #: the predicate on parameter names from ``params`` (``None`` keeps every trainable parameter)
        self.param_filter = param_filter(params, "params")
        self._suffix = state_key_suffix
        self.server: PosteriorServer | None = None
        self.tasks_seen = 0
        self.num_examples: int | None = None
        self._grad_cache: Any = None  # per-posterior tensors of the prior-gradient fast path
        self._fit_params: dict[str, nn.Parameter] | None = None  # selected parameters, fixed during a fit
        #: seconds spent closing tasks (curvature passes, variational updates): benchmarks report it apart
        self.end_task_seconds = 0.0
        self.default_num_examples = (None if num_examples is None
                                     else check_positive_int(num_examples, "num_examples"))
        self.batchnorm = as_enum(BatchNormPolicy, batchnorm, "batchnorm")
        self._batchnorm_layers: list[nn.Module] = []
        self._init_lifecycle()

    # ------------------------------------------------------------------ identity and parameters
    @property
    def state_key(self) -> str:
        return self._generate_state_key(suffix=self._suffix)

    def selected_params(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable parameters that carry a posterior, by name (:func:`bayescl._params.select_params`).

        Raises:
            ValueError: ``params`` selects no trainable parameter.
        """
        return select_params(pl_module, self.param_filter, what="params")

    def selected_param_ids(self, pl_module: nn.Module) -> list[int]:
        """``id`` of each selected parameter (what a conflict check compares)."""
        return [id(p) for p in self.selected_params(pl_module).values()]

    @property
    def posterior_server_key(self) -> str:
        """The checkpoint key of this callback's posterior server."""
        return self._ckpt_key()

    def open_task(self, pl_module: nn.Module) -> None:
        """Called once when a new task's first fit starts (subclasses prepare the model)."""

    def make_prior(self, pl_module: nn.Module) -> Gaussian:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensure_server(self, pl_module: nn.Module) -> PosteriorServer:
        """Create the server on first use; give parameters that appeared since then the base prior."""
        params = self.selected_params(pl_module)
        if self.server is None:
            self.server = PosteriorServer(self.make_prior(pl_module))
        new = {n: p.detach() for n, p in params.items() if n not in self.server.prior}
        if new:
            self.server.extend_prior(new, self.prior_precision)
        return self.server

    def posterior(self) -> Gaussian:
        """The current posterior (the prior of the next task)."""
        if self.server is None:
            raise RuntimeError("no posterior yet: the callback has not been attached to a fit.")
        return self.server.posterior()

    # ------------------------------------------------------------------ unlearning and reset
    def forget(self, task: int | str) -> Gaussian:
        """Remove a task's site (``task`` is its index or the site name); returns the removed site."""
        if self.server is None:
            raise KeyError(f"task {task!r} is unknown: no task has ended yet.")
        name = task if isinstance(task, str) else f"task-{task}"
        site = self.server.remove(name)
        self._grad_cache = None
        return site

    def reset(self) -> None:
        """Forget everything: the next fit starts from the base prior again."""
        self.server, self.tasks_seen, self.num_examples, self._grad_cache = None, 0, None, None
        self.task_open, self.task_steps = False, 0

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_launcher(trainer, type(self).__name__)
        self.spawn_setup()  # under ddp_spawn: where rank 0 hands the state back (bayescl.lightning.spawn)
        self.ensure_server(pl_module)
        self.lifecycle_setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        server = self.ensure_server(pl_module)
        self._fit_params = self.selected_params(pl_module)
        ref = next(iter(self._fit_params.values()))
        server.to(device=ref.device, dtype=ref.dtype)  # Lightning moves and casts the module after setup
        self._grad_cache = None
        n = _dataset_size(trainer.train_dataloader)  # under DDP: the whole dataset, the global N_t
        if n is None:
            n = self.default_num_examples
        if n is None:
            raise ValueError(f"the training data of this fit has no length (an IterableDataset?), so N_t, the "
                             f"scale 1/N_t of the prior term, is unknown: pass num_examples=N_t to "
                             f"{type(self).__name__}.")
        self.set_num_examples(max(1, n))
        self.lifecycle_train_start(trainer, pl_module)
        self._batchnorm_layers = batchnorm_layers(pl_module)
        if self._batchnorm_layers:
            what = ("frozen from the second task on (batchnorm='freeze'), so old tasks keep the statistics they were "
                    "trained with; batchnorm='train' lets them move" if self.batchnorm is BatchNormPolicy.FREEZE
                    else "moving with every task (batchnorm='train'); old tasks are then evaluated with the newest "
                         "task's statistics")
            self._warn_once("batchnorm", f"the model has {len(self._batchnorm_layers)} BatchNorm layers: their "
                                         f"running statistics are {what}.")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.batchnorm is BatchNormPolicy.FREEZE and self.tasks_seen > 0:
            freeze_running_stats(self._batchnorm_layers)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lifecycle_fit_end(trainer, pl_module)
        self._fit_params = None
        self.spawn_fit_end(trainer.global_rank)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._fit_params = None
        self.lifecycle_exception(trainer, exception)

    def set_num_examples(self, num_examples: int) -> None:
        """Set :math:`N_t`, the training-set size of the task being fitted (the prior term is scaled by
        ``1 / N_t``). ``on_train_start`` does it for a Trainer; integrations without one (the Avalanche plugins)
        call it at the start of every task."""
        self.num_examples = check_positive_int(num_examples, "num_examples")
        self._grad_cache = None

    def prior_term_scale(self) -> float:
        """Multiplier of ``Λθ − η`` added to the gradients (``1 / N_t`` by default)."""
        return 1.0 / float(self.num_examples or 1)

    @torch.no_grad()
    def add_prior_grad(self, pl_module: nn.Module, only: set[int] | None = None) -> None:
        """``p.grad += (Λθ − η) / N_t`` for every selected parameter (the documented mechanism).

        Fused (:class:`~bayescl.gaussian.prior_gradient.PriorGradient`, prepared once per posterior and parameter
        list; the parameter list is fixed once per fit in ``on_train_start``).

        Args:
            pl_module: the model.
            only: ``id`` of the parameters the optimizer about to step holds (``None``: all): with several
                optimizers each parameter gets its term once, from its own optimizer's step.
        """
        if self.server is None or len(self.server) == 0 and not self.penalise_prior_alone:
            return
        params = self.step_params(pl_module, only)
        if params is None:
            return
        q = self.posterior()
        cache = self._grad_cache if isinstance(self._grad_cache, dict) else {}
        fused = cache.get(tuple(params))
        if fused is None or fused.q is not q:
            fused = cache[tuple(params)] = PriorGradient(q, params)
        self._grad_cache = cache
        fused.add_(params, self.prior_term_scale())

    def step_params(self, pl_module: nn.Module, only: set[int] | None) -> dict[str, nn.Parameter] | None:
        """The selected parameters that the optimizer about to step holds (``only``: their ``id``; ``None``: all);
        ``None`` when it holds none of them."""
        params = self._fit_params if self._fit_params is not None else self.selected_params(pl_module)
        if only is not None:
            params = {n: p for n, p in params.items() if id(p) in only}
        return params or None

    #: apply the base prior's term on the very first task too (a weak weight decay by default: off).
    penalise_prior_alone = False

    def penalty(self, pl_module: nn.Module) -> Tensor:
        """The prior term ``½ (θ−μ)ᵀ Λ (θ−μ) / N_t`` at the current weights (for logging)."""
        params = self.selected_params(pl_module)
        with torch.no_grad():
            q = self.posterior().quadratic({n: p.detach() for n, p in params.items()})
        return q * self.prior_term_scale()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.add_prior_grad(pl_module, optimizer_param_ids(optimizer))
        self.count_step()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**self.lifecycle_state(), "num_examples": self.num_examples,
                "sites": list(self.server.names) if self.server is not None else []}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_lifecycle_state(state_dict)
        self.num_examples = state_dict.get("num_examples")

    def _ckpt_key(self) -> str:
        return f"{self.prefix}/{self.state_key}"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.server is not None:
            checkpoint[self._ckpt_key()] = self.server.state_dict()

    def check_checkpoint(self, checkpoint: dict[str, Any], pl_module: nn.Module) -> dict[str, Any] | None:
        """This callback's saved posterior in ``checkpoint`` (``None`` if it holds no bayescl posterior).

        Raises:
            ValueError: the checkpoint holds another callback's posterior (class, structure or
                ``state_key_suffix``), other settings, or a parameter this model lacks or has in another shape.
        """
        state = checkpoint.get(self._ckpt_key())
        if state is None:
            saved = sorted(k for k in checkpoint if k.startswith("bayescl") and "/" in k and not k.endswith("coresets"))
            if saved:
                raise ValueError(f"the checkpoint holds the posterior {saved}, not this callback's "
                                 f"{self._ckpt_key()!r} (another callback class, structure or state_key_suffix); "
                                 "resume with the callback settings that wrote it.")
            return None
        check_checkpoint_state(self, checkpoint.get("callbacks", {}).get(self.state_key, {}))
        check_server_params(state, self.ensure_server(pl_module))
        return state

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = self.check_checkpoint(checkpoint, pl_module)
        if state is None:
            return
        server = self.ensure_server(pl_module)
        server.load_state_dict(state)
        self._grad_cache = None
        self.start_from_checkpoint(checkpoint)


def check_checkpoint_state(cb: PosteriorCallback, saved: dict[str, Any]) -> None:
    """Dealbreakers between a saved callback state and the callback resuming it (each a ``ValueError``)."""
    mine = cb.state_dict()
    for key in ("structure", "online"):
        if key in saved and key in mine and saved[key] != mine[key]:
            raise ValueError(f"the checkpoint was written with {key}={saved[key]!r}, this callback has "
                             f"{key}={mine[key]!r}; resume with the settings that wrote it.")


def check_server_params(state: dict[str, Any], server: PosteriorServer) -> None:
    """The saved posterior's parameters must exist with the same shapes (new parameters, e.g. heads, are fine)."""
    prior = state.get("prior", {})
    saved = prior.get("eta") or prior.get("mean") or {}
    current = server.prior.eta
    for n, t in saved.items():
        if n not in current:
            raise ValueError(f"the checkpoint's posterior has parameter {n!r}, which this model has not (selected); "
                             "resume with the model and params= that wrote it.")
        if tuple(t.shape) != tuple(current[n].shape):
            raise ValueError(f"parameter {n!r} has shape {tuple(t.shape)} in the checkpoint and "
                             f"{tuple(current[n].shape)} in the model.")

