r"""Distributed training where every worker keeps a site of one shared Gaussian posterior (a posterior server).

Data-parallel SGD all-reduces every gradient at every step. Here, after Hasenclever et al. (2017), each of the
``W`` workers trains on its own shard :math:`D_k` (``N_k`` examples) against the *cavity* of a shared diagonal
Gaussian posterior and communicates only every ``sync_every = K`` optimizer steps, and only the change of its site:

.. math::

    \eta_q = \eta_0 + \textstyle\sum_k \lambda_k, \qquad
    q_{-k} = q / \lambda_k \quad (\eta_{-k} = \eta_q - \eta_k,\ \Lambda_{-k} = \Lambda_q - \Lambda_k).

**Between syncs** worker ``k`` minimises :math:`\ell_k(\theta) + \frac{1}{2N_k}(\theta-\mu_{-k})^\top
\Lambda_{-k}(\theta-\mu_{-k})` (``ℓ_k`` = the module's batch-mean loss on its shard): before every optimizer step
it adds :math:`(\Lambda_{-k}\theta - \eta_{-k}) / N_k` to the gradients through
:class:`~bayescl.gaussian.prior_gradient.PriorGradient`, the callbacks' path (and like them, not while the cavity
is the base prior alone: :attr:`PosteriorServerStrategy.penalise_prior_alone`). There is no
``DistributedDataParallel`` wrapper (rank 0's weights are broadcast once) and no per-step gradient all-reduce.

**Every K steps** (a Laplace site update): with :math:`\theta_k` the local weights and :math:`F_k` the diagonal
Fisher (:func:`bayescl.curvature.diag_fisher`, ``fisher="mc"`` by default) of the last ``min(K, fisher_batches)``
batches (:math:`n_b` examples), rescaled to the shard,

.. math::

    q_k = \mathcal N\big(\theta_k,\ (\Lambda_{-k} + \tfrac{N_k}{n_b} F_k)^{-1}\big), \qquad
    \lambda_k^{new} = q_k / q_{-k}: \quad \Lambda = \tfrac{N_k}{n_b}F_k,\ \
    \eta = (\Lambda_{-k} + \Lambda)\,\theta_k - \eta_{-k},

damped, :math:`\lambda_k \leftarrow (1-\delta)\lambda_k + \delta\lambda_k^{new}` (``damping=None``:
:math:`\delta = 1/W`, since W parallel undamped EP steps add up W mean shifts and overshoot; one worker: the plain
online-Laplace step of :class:`~bayescl.lightning.laplace.LaplaceCallback`, every K steps). Then **one**
``all_reduce(SUM)`` of :math:`[\Delta\eta_k, \Delta\Lambda_k]` (2 floats per parameter) gives every worker
:math:`\sum_j\Delta\lambda_j`; minus its own change it is the change of the other workers' share. With
``recenter=True`` (default) every worker then restarts from the global mean :math:`\mu_q` (the optimizer's state is
kept); with ``recenter=False`` the workers are coupled only through their cavities. A last sync closes the fit.

**The server.** The posterior is held one way, by a :class:`~bayescl.gaussian.server.PosteriorServer`
(:attr:`server`) whose sites are keyed by :class:`~bayescl.gaussian.server.SiteKey` ``(task, worker)``. During
task ``t`` worker ``k``'s server holds ``prior × past sites × λ_k × λ_others``: its own site ``SiteKey(t, k)``, and
the other workers' share ``SiteKey(t, k, others=True)`` (absent with one worker). The cavity is the server's
(:meth:`PosteriorServer.cavity`, a product without subtraction) with ``floor=True``: the precision is clamped at the
task's prior, since the others' share is a difference of all-reduce sums and an exact 0 may round to either sign.
The damped update is :meth:`PosteriorServer.update`. So every rank holds the same posterior up to float rounding.
At the end of the fit (:meth:`end_task`, automatic by default) one ``all_gather`` replaces the pair by the W sites
``SiteKey(t, j)`` (``"task-t/worker-j"`` in the state dict), bitwise identical on every rank, and
:meth:`posterior` is the prior of the next task (``gather_sites=False``: one ``all_reduce`` merges the own sites
into ``SiteKey(t)``). The next task runs with ``PosteriorServerStrategy(prior=previous.server)`` (keeps every
(task, worker) site: one can be removed to unlearn it) or ``prior=previous.posterior()``. Do not attach a
:class:`~bayescl.lightning.base.PosteriorCallback` as well: it would add a second prior term (``setup`` raises).

Bytes: :attr:`bytes_communicated` (``2P`` floats per sync per worker), :attr:`bytes_gathered` (end of task: ``W × 2P``
floats, ``2P`` with ``gather_sites=False``). Diagonal only: docs/design.md says why; Kronecker: DDP + LaplaceCallback.

Limits: synchronous only; every rank must run the same number of optimizer steps (Lightning's ``DistributedSampler``
pads the shards), otherwise a rank waits at a sync until ``timeout`` and the run fails. A rank that dies, fails or
stalls fails the run: the others' next collective raises within ``timeout`` a ``RuntimeError`` naming the rank, the
step and the sync, and with the ``popen`` launcher rank 0 then kills the workers it started
(:meth:`PosteriorServerStrategy.on_exception`), so none is left behind; ``precision='16-mixed'`` with a ``GradScaler``
is refused (the term would be added to scaled gradients).

Checkpoints and failures: :mod:`bayescl.lightning.strategy_checkpoint`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from bayescl._checks import as_enum, check_bool, check_positive_int, check_real
from bayescl._params import param_filter, select_params
from bayescl.curvature import FisherType
from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.prior_gradient import PriorGradient
from bayescl.gaussian.server import PosteriorServer, SiteKey
from bayescl.lightning import strategy_sites as ops
from bayescl.lightning.strategy_checkpoint import StrategyCheckpointMixin
from bayescl.lightning.strategy_sites import flatten_naturals, laplace_site, unflatten_naturals

__all__ = ["PosteriorServerStrategy", "flatten_naturals", "laplace_site", "unflatten_naturals"]


class PosteriorServerStrategy(StrategyCheckpointMixin, DDPStrategy):
    """Lightning strategy: workers keep sites of one shared diagonal Gaussian posterior (module docstring).

    Use as ``Trainer(strategy=PosteriorServerStrategy(sync_every=10), accelerator="cpu", devices=2)``; processes
    are launched as by ``strategy="ddp"`` (the script is re-run per rank; ``torchrun`` and SLURM work through
    Lightning's cluster environments).

    Args:
        sync_every: ``K``, optimizer steps between two site updates (each one all-reduce of ``2P`` floats).
        damping: ``δ ∈ (0, 1]`` of the site update; ``None`` = ``1 / world_size``.
        prior: the posterior to start from: ``None`` (``N(0, I/prior_precision)``), a :class:`DiagGaussian`
            (e.g. the previous task's :meth:`posterior`) or a :class:`PosteriorServer` (its sites are kept; the
            next task is numbered after its largest :class:`SiteKey` task).
        prior_precision: base prior precision, also given to parameters absent from ``prior``.
        fisher: ``"mc"``, ``"exact"`` or ``"empirical"`` (see :mod:`bayescl.curvature.diag`).
        lam: multiplier :math:`\\lambda > 0` of the local curvature, as ``LaplaceCallback``'s; 0.3 was chosen on
            validation data (``benchmarks/results/distributed/lam-normalized.md``; raw curvature: 1000, ``lam.md``).
        normalize: divide each local curvature by its mean per example over the weights it touches before ``lam``
            multiplies it, as ``LaplaceCallback(normalize=True)`` (:func:`~.strategy_sites.shard_curvature`).
        fisher_batches: at most this many of the last training batches are used for the Fisher at a sync.
        mc_samples: sampled labels per example for ``fisher="mc"``.
        recenter: restart every worker from the global mean after each sync.
        params: regular expressions selecting the parameters with a posterior (``None`` = all trainable).
        num_examples: the shard size ``N_k`` (default: the length of the training sampler on this rank).
        auto_end_task: close the task (:meth:`end_task`) at the end of every ``fit``.
        gather_sites: at the end of a task, all-gather the worker sites (one site per (task, worker), ``W × 2P``
            floats); ``False`` all-reduces them into one site ``SiteKey(t)`` (``2P`` floats).
        seed: seeds the Monte Carlo labels (with the rank and the sync index).
        timeout: timeout of every collective; a worker that dies or stalls makes the others fail after it, with a
            ``RuntimeError`` naming the rank, the step and the sync.
        process_group_backend: ``None`` picks gloo on CPU, nccl on CUDA.
        start_method: as :class:`~pytorch_lightning.strategies.DDPStrategy` (``"popen"`` re-runs the script).
    """

    strategy_name = "posterior_server"

    #: the entry of a Lightning checkpoint that holds the server and every rank's local state
    CHECKPOINT_KEY = "posterior_server_strategy"

    #: apply the term when the cavity is the base prior alone (first task, before any other worker's site has
    #: arrived; with one worker, the whole first task): a weak weight decay, off by default as in the callbacks
    penalise_prior_alone = False

    def __init__(
        self,
        sync_every: int = 10,
        damping: float | None = None,
        prior: DiagGaussian | PosteriorServer | None = None,
        prior_precision: float = 1e-4,
        fisher: str | FisherType = FisherType.MC,
        lam: float = 0.3,
        normalize: bool = True,
        fisher_batches: int = 2,
        mc_samples: int = 1,
        recenter: bool = True,
        params: Sequence[str] | None = None,
        num_examples: int | None = None,
        auto_end_task: bool = True,
        gather_sites: bool = True,
        seed: int = 0,
        timeout: timedelta = timedelta(seconds=120),
        process_group_backend: str | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        if not isinstance(timeout, timedelta):
            raise TypeError(f"timeout must be a datetime.timedelta, got {type(timeout).__name__} {timeout!r}.")
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, start_method=start_method)
        self.collective_timeout = timeout
        self.sync_every = check_positive_int(sync_every, "sync_every")
        self.damping = None if damping is None else check_real(damping, "damping", low=0.0, high=1.0, low_open=True)
        self.prior_precision = check_real(prior_precision, "prior_precision", low=0.0, low_open=True)
        self.fisher = as_enum(FisherType, fisher, "fisher")
        if self.fisher is FisherType.BATCH_SQUARED:
            raise ValueError("fisher='batch_squared' is not valid here; allowed: 'mc', 'exact', 'empirical'.")
        self.fisher_batches = check_positive_int(fisher_batches, "fisher_batches")
        self.lam = check_real(lam, "lam", low=0.0, low_open=True)
        self.normalize = check_bool(normalize, "normalize")
        self.mc_samples = check_positive_int(mc_samples, "mc_samples")
        self.recenter = bool(recenter)
        self._include = param_filter(params, "params")
        self.num_examples = None if num_examples is None else check_positive_int(num_examples, "num_examples")
        self.auto_end_task = bool(auto_end_task)
        self.gather_sites = bool(gather_sites)
        self.seed = int(seed)
        if prior is not None and not isinstance(prior, (DiagGaussian, PosteriorServer)):
            raise TypeError(f"prior must be None, a DiagGaussian or a PosteriorServer, got {type(prior).__name__}.")
        if isinstance(prior, PosteriorServer) and not isinstance(prior.prior, DiagGaussian):
            raise TypeError("prior must hold DiagGaussian sites: this strategy is diagonal only (docs/design.md says "
                            "why); for Kronecker, use strategy='ddp' with LaplaceCallback(structure='kron').")
        self._initial_prior = prior
        #: the posterior, as a prior times (task, worker) sites; identical on every rank after :meth:`end_task`
        self.server: PosteriorServer | None = None
        self.tasks_seen = self.num_syncs = self.bytes_communicated = self.bytes_gathered = 0
        #: max |η, λ| difference between the running posterior and prior × Σ gathered sites at the last end_task
        self.last_gather_drift = 0.0
        self._steps_since_sync = 0
        self._shard_size: int | None = self.num_examples
        self._buffer: deque[Any] = deque(maxlen=self.fisher_batches)
        self._task_syncs = 0
        self._prior_grad: PriorGradient | None = None  # the cavity's gradient, prepared once per sync
        self._resume_state: dict[str, Any] | None = None  # read by load_checkpoint, applied by setup
        self._resume_optimizers: list[Any] | None = None  # this rank's, applied by load_optimizer_state_dict

    # ------------------------------------------------------------------ no DDP wrapper, keys, server
    def configure_ddp(self) -> None:
        """No ``DistributedDataParallel``: broadcast rank 0's parameters and buffers once, as DDP does when it wraps
        a module, then train locally."""
        if self.model is None:
            raise RuntimeError("configure_ddp needs the model: Lightning calls it after connecting the module.")
        ops.broadcast_module(self.model, self.world)

    @property
    def world(self) -> int:
        return int(self.world_size)

    @property
    def own_key(self) -> SiteKey:
        """This worker's site of the current task, ``SiteKey(tasks_seen, global_rank)``."""
        return SiteKey(self.tasks_seen, self.global_rank)

    @property
    def others_key(self) -> SiteKey:
        """The other workers' share of the current task, ``SiteKey(tasks_seen, global_rank, others=True)``."""
        return SiteKey(self.tasks_seen, self.global_rank, others=True)

    @property
    def local_site(self) -> DiagGaussian | None:
        """This worker's site of the current task (held by :attr:`server`), ``None`` outside a task."""
        own = self.own_key
        return self.server[own] if self.server is not None and own in self.server else None

    def selected_params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters with a posterior (:func:`bayescl._params.select_params` with ``params``)."""
        return select_params(module, self._include)

    def _ensure_server(self, module: nn.Module) -> PosteriorServer:
        params = {n: p.detach() for n, p in self.selected_params(module).items()}
        if self.server is None:
            self.server = ops.start_server(self._initial_prior, params, self.prior_precision)
            self.tasks_seen = max(self.server.tasks(), default=-1) + 1
        return ops.check_server(self.server, params, self.prior_precision)

    def posterior(self) -> DiagGaussian:
        """The global posterior ``prior × Π sites`` (the same on every rank, see the module docstring)."""
        if self.server is None:
            raise RuntimeError("no posterior yet: the strategy has not run a fit.")
        return self.server.posterior()

    def cavity(self) -> DiagGaussian:
        """``q / λ_k`` of this worker for the current task (the prior it trains against):
        ``server.cavity(own_key, floor=True)``; the posterior outside a task."""
        if self.local_site is None:
            return self.posterior()
        return self.server.cavity(self.own_key, floor=True)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        resume, self._resume_state = self._resume_state, None
        if trainer.state.fn != TrainerFn.FITTING:
            if resume is not None:
                self.load_server_state(resume)
            return
        ops.check_trainer(trainer, self.precision_plugin)
        if resume is not None:
            self.load_server_state(resume)
        self.open_task(self.lightning_module, keep_progress=resume is not None)

    def open_task(self, module: nn.Module, keep_progress: bool = False) -> None:
        """Start (or continue) the current task: the server gets empty sites ``own_key`` (and ``others_key`` with
        several workers) unless it has them; called by :meth:`setup` at every ``fit``.

        Args:
            module: the trained module (its selected parameters shape the sites).
            keep_progress: keep the steps and batches since the last sync (a fit resumed from a checkpoint);
                otherwise a continued task starts a new sync period.
        """
        server = self._ensure_server(module)
        if self.own_key not in server:
            server.add(self.own_key, DiagGaussian.zeros_like(server.prior.eta))
            if self.world > 1:
                server.add(self.others_key, DiagGaussian.zeros_like(server.prior.eta))
            self._task_syncs = 0
            keep_progress = False
        if not keep_progress:
            self._steps_since_sync = 0
            self._buffer.clear()
        self._prior_grad = None

    def on_train_start(self) -> None:
        super().on_train_start()
        n = self.num_examples if self.num_examples is not None else ops.shard_size(self.lightning_module.trainer,
                                                                               self.world)
        self._shard_size = max(1, int(n))

    def observe(self, batch: Any) -> None:
        """Keep ``batch`` for the next curvature estimate (the last ``fisher_batches`` are kept)."""
        self._buffer.append(batch)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if args or "batch" in kwargs:
            self.observe(args[0] if args else kwargs["batch"])
        return super().training_step(*args, **kwargs)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_with_cavity() -> Any:
            out = closure()
            self.add_cavity_grad(self.lightning_module)
            return out

        out = super().optimizer_step(optimizer, closure_with_cavity, model, **kwargs)
        self._steps_since_sync += 1
        if self._steps_since_sync >= self.sync_every:
            self.sync()
        return out

    def on_train_end(self) -> None:
        super().on_train_end()
        if self._steps_since_sync > 0:
            self.sync()
        if self.auto_end_task:
            self.end_task()

    # ------------------------------------------------------------------ the algorithm
    def add_cavity_grad(self, module: nn.Module) -> None:
        """``p.grad += (Λ_{-k} θ − η_{-k}) / N_k`` for every selected parameter
        (:class:`~bayescl.gaussian.prior_gradient.PriorGradient` of :meth:`cavity`, prepared once per sync)."""
        if self.server is None or self._cavity_is_base_prior():
            return
        params = self.selected_params(module)
        if self._prior_grad is None:
            self._prior_grad = PriorGradient(self.cavity(), params)
        self._prior_grad.add_(params, 1.0 / float(self._shard_size or 1))

    def _cavity_is_base_prior(self) -> bool:
        if self.penalise_prior_alone or self._initial_prior is not None:
            return False
        only_this_task = all(k in (self.own_key, self.others_key) for k in self.server.names)
        return only_this_task and (self.world == 1 or self._task_syncs == 0)

    def _damping(self) -> float:
        return self.damping if self.damping is not None else 1.0 / self.world

    def local_curvature(self, module: nn.Module) -> dict[str, Tensor]:
        """``λ N_k / n_b ×`` the summed diagonal Fisher over the buffered batches (``n_b`` examples); with
        ``normalize``, ``λ N_k ×`` that Fisher over its mean on the weights it touches."""
        return ops.shard_curvature(module, list(self._buffer), list(self.selected_params(module)), self.fisher,
                                   self.mc_samples, self.seed + 1_000_003 * self.global_rank + self.num_syncs,
                                   self._shard_size or 1, self.lam, self.normalize)

    @torch.no_grad()
    def sync(self) -> DiagGaussian:
        """One synchronous round (collective: every rank must call it); returns the new global posterior.

        The new local site ``λ_k^new`` (:func:`laplace_site` at the current weights), damped by the server
        (:meth:`PosteriorServer.update` with ``δ``), then one ``all_reduce`` of its change ``Δλ_k``: the other
        workers' share becomes ``λ_others + Σ_j Δλ_j − Δλ_k``.
        """
        module, server, own = self.lightning_module, self.server, self.own_key
        if server is None or own not in server:
            raise RuntimeError("sync needs a running task: the strategy opens one at the start of every fit.")
        theta = {n: p.detach().clone() for n, p in self.selected_params(module).items()}
        new = laplace_site(self.cavity(), theta, self.local_curvature(module))
        old = server[own]
        delta = flatten_naturals(server.update(own, new, damping=self._damping())) - flatten_naturals(old)
        if self.world > 1:
            total = self._all_reduce_sum(delta)
            self.bytes_communicated += delta.numel() * delta.element_size()
            server.replace(self.others_key, server[self.others_key] * unflatten_naturals(total - delta, old))
        self.num_syncs += 1
        self._task_syncs += 1
        self._steps_since_sync = 0
        self._buffer.clear()
        self._prior_grad = None
        q = server.posterior()
        if self.recenter:
            self._load_mean(module, q)
        return q

    @torch.no_grad()
    def _load_mean(self, module: nn.Module, q: DiagGaussian) -> None:
        mean = q.mean
        for n, p in self.selected_params(module).items():
            p.copy_(mean[n].to(p))

    @torch.no_grad()
    def end_task(self) -> DiagGaussian:
        """Close the current task (collective): the own and others' sites are replaced by the W gathered worker
        sites ``SiteKey(t, j)`` (or, with ``gather_sites=False``, by their all-reduced sum ``SiteKey(t)``),
        identical on every rank; returns the global posterior (the next task's prior)."""
        server, own, others = self.server, self.own_key, self.others_key
        if server is None or own not in server:
            raise RuntimeError("end_task needs a running task: call it after a fit with this strategy.")
        running = server.posterior()
        mine = server[own]
        vec = flatten_naturals(mine)
        if self.gather_sites:
            parts = self._all_gather(vec)
            keys = [SiteKey(self.tasks_seen, j) for j in range(len(parts))]
        else:
            parts, keys = [self._all_reduce_sum(vec)], [SiteKey(self.tasks_seen)]
        if self.world > 1:
            self.bytes_gathered += vec.numel() * vec.element_size() * (self.world if self.gather_sites else 1)
        for key in (others, own):  # others first: it may be signed by rounding, and removing it checks the rest
            if key in server:
                server.remove(key)
        for key, part in zip(keys, parts):
            server.add(key, unflatten_naturals(part, mine))
        q = server.posterior()
        self.last_gather_drift = float((flatten_naturals(q) - flatten_naturals(running)).abs().max())
        self.tasks_seen += 1
        self._prior_grad = None
        if self.recenter and self.lightning_module is not None:
            self._load_mean(self.lightning_module, q)
        return q

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks and logs."""
        return {"num_syncs": self.num_syncs, "bytes_communicated": self.bytes_communicated, "bytes_gathered":
                self.bytes_gathered, "tasks_seen": self.tasks_seen, "world_size": self.world, "damping": self._damping(),
                "sync_every": self.sync_every, "last_gather_drift": self.last_gather_drift}
