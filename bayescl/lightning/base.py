"""What every bayescl callback shares: a :class:`~bayescl.gaussian.server.PosteriorServer` as its state, task
boundaries, unlearning, checkpoints, and the one mechanism that adds a prior term to the gradients.

The prior term. For task ``t`` with ``N_t`` training examples the MAP objective is
``−log p(D_t | θ) − log q_{t−1}(θ)``; divided by ``N_t`` (Lightning losses are batch means) it is

.. math::  \\ell(\\theta) + \\frac{1}{2N_t} (\\theta-\\mu)^\\top \\Lambda (\\theta-\\mu),

so after ``backward`` each gradient gets ``(Λθ − η) / N_t`` added, in ``on_before_optimizer_step``: once per
optimizer step whatever ``accumulate_grad_batches`` is, after AMP unscaling and before gradient clipping.
The user's LightningModule is never edited.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from bayescl._checks import check_positive_int, check_real
from bayescl._params import param_filter, select_params
from bayescl.gaussian import Gaussian, PosteriorServer, PriorGradient


def _dataset_size(dataloader: Any) -> int | None:
    ds = getattr(dataloader, "dataset", None)
    try:
        return len(ds) if ds is not None else None
    except TypeError:
        return None


class PosteriorCallback(pl.Callback):
    """Base class: holds the posterior server and the task bookkeeping; subclasses say how a task ends.

    Args:
        prior_precision: precision of the isotropic zero-mean base prior ``N(0, I / prior_precision)``; also
            given to parameters that appear later (new heads).
        params: regular expressions (``re.search`` on the LightningModule's parameter names) selecting the
            parameters that carry a posterior; ``None`` = every trainable parameter.
        state_key_suffix: distinguishes two instances of the same class on one Trainer.

    Raises:
        TypeError: ``params`` is not a list of strings.
        ValueError: ``prior_precision <= 0`` or a pattern of ``params`` is not a valid regular expression.
    """

    prefix = "bayescl"

    def __init__(self, prior_precision: float = 1e-4, params: Sequence[str] | None = None,
                 state_key_suffix: str = "") -> None:
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

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.ensure_server(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ensure_server(pl_module)
        self._fit_params = self.selected_params(pl_module)
        n = _dataset_size(trainer.train_dataloader)
        if n is None:
            n = int(trainer.num_training_batches) * int(getattr(trainer.train_dataloader, "batch_size", 1) or 1)
        self.set_num_examples(max(1, n))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_params = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._fit_params = None

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
    def add_prior_grad(self, pl_module: nn.Module) -> None:
        """``p.grad += (Λθ − η) / N_t`` for every selected parameter (the documented mechanism).

        Fused (:class:`~bayescl.gaussian.server.PriorGradient`, prepared once per posterior; the parameter list is fixed
        once per fit in ``on_train_start``).
        """
        if self.server is None or len(self.server) == 0 and not self.penalise_prior_alone:
            return
        params = self._fit_params if self._fit_params is not None else self.selected_params(pl_module)
        q = self.posterior()
        fused = self._grad_cache
        if fused is None or fused.q is not q or fused.names != tuple(params):
            fused = self._grad_cache = PriorGradient(q, params)
        fused.add_(params, self.prior_term_scale())

    #: apply the base prior's term on the very first task too (a weak weight decay by default: off).
    penalise_prior_alone = False

    def penalty(self, pl_module: nn.Module) -> Tensor:
        """The prior term ``½ (θ−μ)ᵀ Λ (θ−μ) / N_t`` at the current weights (for logging)."""
        params = self.selected_params(pl_module)
        with torch.no_grad():
            q = self.posterior().quadratic({n: p.detach() for n, p in params.items()})
        return q * self.prior_term_scale()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.add_prior_grad(pl_module)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"tasks_seen": self.tasks_seen, "num_examples": self.num_examples,
                "sites": list(self.server.names) if self.server is not None else []}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tasks_seen = int(state_dict.get("tasks_seen", 0))
        self.num_examples = state_dict.get("num_examples")

    def _ckpt_key(self) -> str:
        return f"{self.prefix}/{self.state_key}"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.server is not None:
            checkpoint[self._ckpt_key()] = self.server.state_dict()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(self._ckpt_key())
        if state is None:
            return
        server = self.ensure_server(pl_module)
        server.load_state_dict(state)
        self._grad_cache = None

