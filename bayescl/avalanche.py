r"""Avalanche plugins over the bayescl callbacks (``pip install "bayescl[avalanche]"``, Avalanche 0.6).

**bayescl inside an Avalanche strategy.** :class:`LaplacePlugin` is a ``SupervisedPlugin`` that holds a
:class:`~bayescl.lightning.laplace.LaplaceCallback` and drives it from Avalanche's hooks; the maths is the
callback's, not a second implementation::

    from avalanche.training import Naive
    strategy = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=64,
                     train_epochs=5, plugins=[LaplacePlugin(structure="kron")], evaluator=evaluator)
    for exp in benchmark.train_stream:
        strategy.train(exp)

Hook by hook (Avalanche's SGD loop: ``zero_grad → forward → criterion → before_backward → backward →
after_backward → before_update → optimizer.step``):

* ``before_training_exp`` (after Avalanche's model adaptation, so heads that a ``MultiHeadClassifier`` grows
  for the new experience exist): ``callback.ensure_server(model)`` gives parameters not seen so far the base prior,
  and ``callback.set_num_examples(N_t)`` with :math:`N_t` the size of the data the strategy trains on
  (``strategy.adapted_dataset``: the experience's dataset, plus replay data when a replay plugin added some).
* ``before_update`` (after ``backward``, before the optimizer step): ``callback.add_prior_grad(model)`` adds
  :math:`(\Lambda\theta-\eta)/N_t` to the gradients, once per optimizer step.
* ``after_training_exp``: ``callback.end_task(None, model, loader)`` with a loader over the experience's dataset
  (its *eval* transforms, no augmentation) yielding bayescl's batch convention: ``(x, y, task_labels)`` for an
  Avalanche ``MultiTaskModule`` (called as ``model(x, task_labels)``), ``(x, y)`` for a single-head model.
  A batch that mixes task labels is split per label, so each head is called on whole sub-batches.

**VCL.** :class:`VCLPlugin` drives a :class:`~bayescl.lightning.vcl.VCLCallback` the same way:

* ``before_training_exp``: ``convert`` swaps the model's ``nn.Linear`` / ``nn.Conv2d`` for mean-field Gaussian
  layers (idempotent; heads a ``MultiHeadClassifier`` grew for this experience are converted here). When that
  changed the parameters, the new ``*_mu`` / ``*_logvar`` tensors join the parameter group of the weights they
  replace and the plugin calls the strategy's public ``strategy.make_optimizer(remove_params=True)`` (Avalanche 0.6
  ``BatchObservation.make_optimizer``: ``update_optimizer`` over ``model.named_parameters()`` and
  ``strategy.optimized_param_id``, which it updates): the replaced plain weights leave the optimizer; groups,
  hyper-parameters and the optimizer state of unchanged parameters are kept. Then, as in Lightning's ``on_train_start``, the layers are
  set to the current posterior (``q_{t-1}``), ``N_t`` is set and ``enable_predictive(model, test_samples)`` is
  installed.
* ``before_training_epoch``: the maximum-likelihood start (``ml_init``) is driven by Avalanche's epoch counter:
  the callback's ``in_ml_phase`` gets ``strategy.clock.train_exp_epochs`` as the epoch (first experience
  only, ``ml_epochs`` epochs with means only and no KL); give ``ml_init=False`` to switch it off.
* ``before_update``: ``callback.add_prior_grad(model, epoch)`` (the same Avalanche epoch) adds
  ``∇KL(q || q_{t-1}) / N_t``.
* ``after_training_exp``: sampling on again and ``callback.end_task(None, model)`` (site ``q_t / q_{t-1}``).
* Evaluation: the model's eval-mode call returns the log of the softmax averaged over ``test_samples`` samples
  (``enable_predictive``), so Avalanche's metrics and loss see the MC-averaged prediction; the noise is seeded
  per evaluated experience.

Not supported by ``VCLPlugin`` yet (``ValueError``): coresets (``coreset_size > 0``) and
``vectorize_samples=False``; ``train_samples = k > 1`` repeats the minibatch ``k`` times in ``before_forward`` (one
pass, :func:`bayescl.methods.variational.tiled`), so Avalanche's criterion averages the ``k`` samples.
Heads must not grow after conversion (an ``IncrementalClassifier`` growing a converted layer fails): give each
head its final size (``MultiHeadClassifier`` heads for task-incremental benchmarks do not grow).

The plugins use the strategy's public ``model``, ``experience``, ``adapted_dataset``, ``train_mb_size`` (and, for
``VCLPlugin``, ``make_optimizer``, ``clock`` and ``mbatch``), no private attribute of Avalanche or of the
callbacks, and work with every SGD-based Avalanche strategy, ``EvaluationPlugin`` and loggers. ``supports_distributed = False``: the curvature pass and the KL term
are not reduced across processes (not verified with Avalanche's distributed support).

**Avalanche benchmarks in Lightning** (turning a benchmark into a task stream for a Lightning loop or the
harness) live in the harness: :mod:`bayescl.harness.avalanche_stream` (``stream_from_benchmark``,
``make_avalanche_stream``).

This module imports Avalanche at import time; it imports the core, methods and Lightning callbacks only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

try:
    from avalanche.core import SupervisedPlugin
    from avalanche.models.utils import is_multi_task_module
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'bayescl.avalanche needs Avalanche (avalanche-lib >= 0.6): pip install "bayescl[avalanche]".'
    ) from exc

from bayescl._checks import check_positive_int
from bayescl.lightning.base import PosteriorCallback
from bayescl.lightning.laplace import LaplaceCallback
from bayescl.lightning.vcl import VCLCallback
from bayescl.methods.variational import (
    convert,
    is_stochastic,
    set_stochastic,
    set_tiles,
    tile_batch,
)
from bayescl.methods.variational_predictive import enable_predictive

__all__ = [
    "ExperienceBatches",
    "LaplacePlugin",
    "PosteriorPlugin",
    "VCLPlugin",
]


# --------------------------------------------------------------------------------------------------- batches
def _split_by_task(x: Tensor, y: Tensor, t: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    uniq = torch.unique(t)
    if uniq.numel() <= 1:
        yield x, y, t
        return
    for u in uniq:
        m = t == u
        yield x[m], y[m], t[m]


def plugin_callback(cls: type, callback: Any, kwargs: dict[str, Any], lightning_only: tuple[str, ...]) -> Any:
    """A plugin's callback: ``callback`` itself (an instance of ``cls``, with no other argument given), or
    ``cls(auto_end_task=False, **kwargs)`` (the plugin closes each experience itself).

    Raises:
        ValueError: both ``callback`` and ``kwargs``, or a Lightning-only argument (``lightning_only``).
        TypeError: ``callback`` is not a ``cls``.
    """
    if callback is None:
        for bad in lightning_only:
            if bad in kwargs:
                raise ValueError(f"{bad} is a Lightning-only argument of {cls.__name__}; the plugin takes each "
                                 "experience's data and closes the task itself.")
        return cls(auto_end_task=False, **kwargs)
    if kwargs:
        raise ValueError(f"give either callback= or {cls.__name__} arguments, not both; got callback and "
                         f"{sorted(kwargs)}.")
    if not isinstance(callback, cls):
        raise TypeError(f"callback must be a {cls.__name__}, got {type(callback).__name__}.")
    return callback


class ExperienceBatches:
    """An iterable over an Avalanche dataset in bayescl's batch convention (for the curvature pass).

    Avalanche datasets yield ``(x, y, ..., t)``; batches are ``(x, y, t)`` when ``multi_task`` (the model is
    an Avalanche ``MultiTaskModule``, called as ``model(x, t)``) and ``(x, y)`` otherwise. With ``multi_task``
    a batch that mixes task labels is split into one batch per label.

    Args:
        dataset: an Avalanche dataset (its ``collate_fn`` is used when it has one) or any dataset of tuples.
        batch_size: examples per batch.
        multi_task: keep the task labels (see above).
    """

    def __init__(self, dataset: Dataset, batch_size: int = 256, multi_task: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.multi_task = bool(multi_task)

    def __len__(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        return max(0, (n + self.batch_size - 1) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,
                            collate_fn=getattr(self.dataset, "collate_fn", None))
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"the experience's dataset must yield (x, y, task_label) tuples; got a batch of "
                                 f"type {type(batch).__name__}.")
            x, y = batch[0], torch.as_tensor(batch[1])
            if not self.multi_task:
                yield x, y
                continue
            if len(batch) < 3:
                raise ValueError("the model is a MultiTaskModule but the experience's dataset yields no task "
                                 "labels (items of length 2); build the benchmark with task labels.")
            yield from _split_by_task(x, y, torch.as_tensor(batch[-1]))


# --------------------------------------------------------------------------------------------------- plugins
class PosteriorPlugin(SupervisedPlugin, supports_distributed=False):
    """Drives a bayescl :class:`~bayescl.lightning.base.PosteriorCallback` from Avalanche's hooks.

    Subclasses say how an experience ends (:meth:`after_training_exp`). The callback is public
    (:attr:`callback`): its posterior server, ``forget`` and ``reset`` work as in Lightning.
    """

    def __init__(self, callback: PosteriorCallback) -> None:
        super().__init__()
        if not isinstance(callback, PosteriorCallback):
            raise TypeError(f"callback must be a bayescl PosteriorCallback, got {type(callback).__name__}.")
        self.callback = callback

    # -------------------------------------------------------------- pass-throughs
    @property
    def server(self):
        """The callback's posterior server (``None`` before the first experience)."""
        return self.callback.server

    def posterior(self):
        """The current posterior (the prior of the next experience)."""
        return self.callback.posterior()

    def forget(self, task: int | str):
        """Remove an experience's site (index or site name); see ``PosteriorCallback.forget``."""
        return self.callback.forget(task)

    def reset(self) -> None:
        """Forget everything: the next experience starts from the base prior."""
        self.callback.reset()

    # -------------------------------------------------------------- hooks
    @staticmethod
    def training_set_size(strategy: Any) -> int:
        """:math:`N_t`: the size of the dataset the strategy trains on for this experience."""
        ds = getattr(strategy, "adapted_dataset", None)
        if ds is None:
            ds = strategy.experience.dataset
        return max(1, len(ds))

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Base prior for parameters not seen so far; :math:`N_t` for this experience."""
        self.callback.ensure_server(strategy.model)
        self.callback.set_num_examples(self.training_set_size(strategy))

    def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Add the prior's gradient term, once per optimizer step."""
        self.callback.add_prior_grad(strategy.model)


class LaplacePlugin(PosteriorPlugin):
    """Online Laplace (diagonal = online EWC with a Bayesian scale, or Kronecker-factored) for Avalanche.

    Args:
        structure: ``"diag"`` or ``"kron"`` (see :class:`~bayescl.lightning.laplace.LaplaceCallback`).
        callback: an existing ``LaplaceCallback`` to drive instead of building one (then give no other
            callback argument).
        curvature_batch_size: batch size of the curvature pass (default: the strategy's ``train_mb_size``).
        **kwargs: the other ``LaplaceCallback`` arguments (``fisher``, ``prior_precision``, ``lam``, ``gamma``,
            ``online``, ``params``, ``mc_samples``, ``max_batches``, ``seed``); parameter names are the model's
            (``strategy.model.named_parameters()``).
    """

    #: the callback the plugin drives (a subclass plugin names its own)
    callback_class: type[LaplaceCallback] = LaplaceCallback

    def __init__(self, structure: str = "diag", *, callback: LaplaceCallback | None = None,
                 curvature_batch_size: int | None = None, **kwargs: Any) -> None:
        if callback is None or structure != "diag":
            kwargs = {"structure": structure, **kwargs}
        super().__init__(plugin_callback(self.callback_class, callback, kwargs, ("dataloader", "auto_end_task")))
        self.curvature_batch_size = (None if curvature_batch_size is None
                                     else check_positive_int(curvature_batch_size, "curvature_batch_size"))

    def curvature_batches(self, strategy: Any) -> ExperienceBatches:
        """The curvature pass's data: the experience's dataset (eval transforms) in bayescl's convention."""
        ds = strategy.experience.dataset
        if hasattr(ds, "eval"):
            ds = ds.eval()
        bs = self.curvature_batch_size or int(getattr(strategy, "train_mb_size", 256) or 256)
        return ExperienceBatches(ds, bs, multi_task=is_multi_task_module(strategy.model))

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Close the experience: the curvature pass adds its site to the posterior."""
        self.callback.end_task(None, strategy.model, self.curvature_batches(strategy))


class VCLPlugin(PosteriorPlugin):
    """Variational continual learning (mean-field Gaussian layers, KL to the previous posterior) for Avalanche.

    Args:
        callback: an existing ``VCLCallback`` to drive instead of building one (then give no other argument).
        **kwargs: the ``VCLCallback`` arguments (``prior_precision``, ``logvar_init``, ``train_samples``,
            ``test_samples``, ``ml_init``, ``ml_epochs``, ``params``, ``seed``); parameter names are the model's
            logical names (``trunk.1.weight`` for the layer ``trunk.1``). ``logvar_init`` is a constant or
            ``"fan_in"`` / ``"fan_in:<r>"`` (per-layer ``log(r / (3 fan_in))``), checked here by ``VCLCallback``.

    Raises:
        ValueError: ``coreset_size > 0`` or ``vectorize_samples=False`` (not supported by VCLPlugin yet), or
            Lightning-only arguments.
    """

    def __init__(self, *, callback: VCLCallback | None = None, **kwargs: Any) -> None:
        callback = plugin_callback(VCLCallback, callback, kwargs, ("auto_end_task",))
        if callback.coreset_size > 0:
            raise ValueError(f"coreset_size={callback.coreset_size}: coresets are not supported by VCLPlugin yet; "
                             "use coreset_size=0 (or the Lightning VCLCallback).")
        if callback.train_samples > 1 and not callback.vectorize_samples:
            raise ValueError("vectorize_samples=False (one training pass per sample) is not supported by VCLPlugin "
                             "yet; use vectorize_samples=True, which runs the samples as one pass over the "
                             "repeated minibatch.")
        super().__init__(callback)

    @staticmethod
    def _epoch(strategy: Any) -> int:
        """The epoch within the experience (Avalanche's clock)."""
        return int(strategy.clock.train_exp_epochs)

    def convert_model(self, strategy: Any) -> bool:
        """Make the model's layers variational and update the strategy's optimizer.

        A new ``*_mu`` / ``*_logvar`` tensor joins the parameter group that held its layer's plain weights
        (``torch.optim.Optimizer.param_groups``); then the strategy's public ``make_optimizer(remove_params=True)``
        (Avalanche's ``update_optimizer``) drops the replaced weights and updates ``strategy.optimized_param_id``.
        Avalanche alone cannot place them when the optimizer has several groups: every parameter it could infer a
        group from was replaced.

        Args:
            strategy: the Avalanche strategy (``model``, ``optimizer``, ``make_optimizer``).

        Returns:
            Whether the conversion changed the model's parameters.

        Raises:
            TypeError: the parameters changed and the strategy has no ``make_optimizer`` (not an SGD strategy).
        """
        cb, model = self.callback, strategy.model
        groups = getattr(getattr(strategy, "optimizer", None), "param_groups", [])
        group_of = {id(p): g for g in groups for p in g["params"]}
        layer_group = {n.rpartition(".")[0]: group_of[id(p)] for n, p in model.named_parameters() if id(p) in group_of}
        before = {id(p) for p in model.parameters()}
        convert(model, cb.logvar_init, include=cb.include_layer)
        changed = {id(p) for p in model.parameters()} != before
        if changed:
            make_optimizer = getattr(strategy, "make_optimizer", None)
            if not callable(make_optimizer):
                raise TypeError(f"strategy must be an Avalanche SGD strategy with make_optimizer() (VCLPlugin "
                                f"updates the optimizer after swapping in variational layers); got "
                                f"{type(strategy).__name__}.")
            for name, p in model.named_parameters():
                group = layer_group.get(name.rpartition(".")[0])
                if id(p) not in before and group is not None:
                    group["params"].append(p)
            make_optimizer(remove_params=True)
        enable_predictive(model, cb.test_samples)
        return changed

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Convert the layers, update the optimizer, and start from the current posterior."""
        cb, model = self.callback, strategy.model
        self.convert_model(strategy)
        super().before_training_exp(strategy, *args, **kwargs)
        if not cb.task_open:
            if cb.tasks_seen > 0:
                cb.apply_posterior(model)
            cb.task_open = True

    def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Means only during the maximum-likelihood start, sampling afterwards."""
        set_stochastic(strategy.model, not self.callback.in_ml_phase(self._epoch(strategy)))

    def before_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Seed the weight noise by (task, epoch, iteration)."""
        clock = strategy.clock
        self.callback.seed_noise(strategy.model, 0, self.callback.tasks_seen, int(clock.train_exp_epochs),
                                 int(clock.train_epoch_iterations))

    def before_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """With ``train_samples = k > 1``, repeat the minibatch ``k`` times (one pass)."""
        k = self.callback.train_samples
        if k > 1 and is_stochastic(strategy.model):  # k samples in one pass over the repeated minibatch
            strategy.mbatch = tile_batch(list(strategy.mbatch), k)
            set_tiles(strategy.model, k)

    def after_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Back to one sample per example."""
        set_tiles(strategy.model, 1)

    #: the KL's value (a sum over every layer, as costly as its gradient) is computed, and checked to be finite, on
    #: each epoch's first iteration and every ``check_every`` iterations after it, as the Lightning callback does at
    #: its logging steps; the gradient is added on every iteration.
    check_every: int = 50

    def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Add ``∇KL(q || q_{t-1}) / N_t`` (none during the maximum-likelihood start); the value on some iterations
        (:attr:`check_every`)."""
        value = int(strategy.clock.train_epoch_iterations) % self.check_every == 0
        self.callback.add_prior_grad(strategy.model, self._epoch(strategy), value=value)

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Close the experience: the site ``q_t / q_{t-1}``."""
        set_stochastic(strategy.model, True)
        self.callback.end_task(None, strategy.model)

    def before_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Seed the predictive's noise per evaluated experience."""
        exp = getattr(strategy, "experience", None)
        self.callback.seed_noise(strategy.model, 1, int(getattr(exp, "current_experience", 0) or 0))
