r"""Distributed training where every worker keeps a site of one shared Gaussian posterior (a posterior server).

Data-parallel SGD all-reduces every gradient at every step. Here, after Hasenclever et al. (2017), each of the
``W`` workers trains on its own shard :math:`D_k` (``N_k`` examples) against the *cavity* of a shared diagonal
Gaussian posterior and communicates only every ``sync_every = K`` optimizer steps, and only the change of its site:

.. math::

    \eta_q = \eta_0 + \textstyle\sum_k \lambda_k, \qquad
    q_{-k} = q / \lambda_k \quad (\eta_{-k} = \eta_q - \eta_k,\ \Lambda_{-k} = \Lambda_q - \Lambda_k).

**Between syncs** worker ``k`` minimises :math:`\ell_k(\theta) + \frac{1}{2N_k}(\theta-\mu_{-k})^\top
\Lambda_{-k}(\theta-\mu_{-k})` (``ℓ_k`` = the module's batch-mean loss on its shard): before every optimizer step
the strategy adds :math:`(\Lambda_{-k}\theta - \eta_{-k}) / N_k` (:meth:`DiagGaussian.quadratic_grad`) to the
gradients, the same formula as :mod:`bayescl.lightning.base` (and, like the callbacks, not while the cavity is
the base prior alone: :attr:`PosteriorServerStrategy.penalise_prior_alone`). There is no
``DistributedDataParallel`` wrapper and no per-step gradient all-reduce.

**Every K steps** (the site update, Laplace-style): with :math:`\theta_k` the local weights and
:math:`F_k` a diagonal Fisher estimated by :func:`bayescl.curvature.diag_fisher` on the last
``min(K, fisher_batches)`` training batches of the shard (``fisher="mc"`` by default: one sampled label per
example, unbiased), rescaled from the :math:`n_b` buffered examples to the shard,

.. math::

    q_k = \mathcal N\big(\theta_k,\ (\Lambda_{-k} + \tfrac{N_k}{n_b} F_k)^{-1}\big), \qquad
    \lambda_k^{new} = q_k / q_{-k}: \quad \Lambda = \tfrac{N_k}{n_b}F_k,\ \
    \eta = (\Lambda_{-k} + \Lambda)\,\theta_k - \eta_{-k},

damped in natural parameters, :math:`\lambda_k \leftarrow (1-\delta)\lambda_k + \delta\lambda_k^{new}`
(``damping=None`` means :math:`\delta = 1/W`: the W sites are updated in parallel against the same posterior and
undamped parallel EP steps add up W mean shifts and overshoot; with one worker :math:`\delta = 1`, the plain
online-Laplace step). Then **one** ``all_reduce(SUM)`` of the flat vector :math:`[\Delta\eta_k, \Delta\Lambda_k]`
(2 floats per parameter) gives every worker the same :math:`\sum_k\Delta\lambda_k`, added to the current task's
total site, so every rank holds a bitwise identical global posterior. With ``recenter=True`` (default) every
worker then restarts from the global mean :math:`\mu_q` (so all ranks hold identical weights after a sync; the
optimizer's state, e.g. Adam's moments, is kept); with ``recenter=False`` each keeps its local weights and the
workers are coupled only through their cavities. A last sync closes the fit when steps are left over.

Why Laplace and not a variational site: it needs only a Fisher pass on batches already in memory and no extra
parameters, and with one worker and ``δ = 1`` each sync is the online-Laplace step of
:class:`~bayescl.lightning.laplace.LaplaceCallback` (``q ← (q_{-k} · curvature)`` re-centred on ``θ_k``), taken every
K steps and with the Fisher of the last batches instead of a full pass.

**Continual learning.** Sites are (task, worker). During a fit the server holds ``prior × past sites × the
current task's total`` (``task-t/total``, the sum of the worker sites); each worker also keeps its own site
locally. At the end of the fit (:meth:`end_task`, automatic by default) one ``all_gather`` replaces the total by
the W sites ``task-t/worker-j``, so every rank holds the same :class:`~bayescl.gaussian.server.PosteriorServer`
(:attr:`server`), and :meth:`posterior` is the global posterior, the prior of the next task
(``gather_sites=False`` skips the gather and keeps the identical total as one site ``task-t``). The next task runs
with ``PosteriorServerStrategy(prior=previous.server)`` (keeps every (task, worker) site: one can be removed to
unlearn it) or ``prior=previous.posterior()`` (one Gaussian). Do not attach a
:class:`~bayescl.lightning.base.PosteriorCallback` as well: it would add a second prior term (``setup`` raises).

Bytes: :attr:`bytes_communicated` counts the sync payloads (``2 P`` floats per sync, the vector each worker puts
into the all-reduce; a ring all-reduce moves about twice that over the wire), :attr:`bytes_gathered` the end-of-task
gathers (``W × 2P`` floats per task); both stay 0 with one worker (no collective is called). Data-parallel SGD puts ``P`` floats (the gradients) into an all-reduce at
every step.

Limits: synchronous only (an asynchronous server, where workers push deltas without waiting, is not provided);
every rank must run the same number of optimizer steps (Lightning's ``DistributedSampler`` pads the shards to equal
length), otherwise a rank waits at a sync until ``timeout`` and the run fails; 16-bit mixed precision with a
``GradScaler`` is refused (the cavity term would be added to scaled gradients); the server is not saved in
checkpoints yet.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.overrides.distributed import _sync_module_states
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from bayescl._checks import as_enum, check_positive_int, check_real
from bayescl.curvature import FisherType, diag_fisher
from bayescl.gaussian import laplace_site as _laplace_site
from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.prior_gradient import add_scaled_grads
from bayescl.gaussian.server import PosteriorServer

__all__ = ["PosteriorServerStrategy", "flatten_naturals", "laplace_site", "unflatten_naturals"]


# ------------------------------------------------------------------------------------------- pure helpers
def flatten_naturals(g: DiagGaussian) -> Tensor:
    """``[η_1, …, η_P, λ_1, …, λ_P]`` as one flat vector (parameter order of ``g.names``)."""
    return torch.cat([t.reshape(-1) for t in g.eta.values()] + [t.reshape(-1) for t in g.precision.values()])


def unflatten_naturals(vec: Tensor, like: DiagGaussian) -> DiagGaussian:
    """Inverse of :func:`flatten_naturals`: a :class:`DiagGaussian` with ``like``'s names and shapes."""
    n = len(like)
    if vec.numel() != 2 * n:
        raise ValueError(f"vec has {vec.numel()} entries but a Gaussian over {n} scalars needs {2 * n}.")
    out_eta, out_prec, i = {}, {}, 0
    for name, t in like.eta.items():
        out_eta[name] = vec[i:i + t.numel()].view_as(t).clone()
        out_prec[name] = vec[n + i:n + i + t.numel()].view_as(t).clone()
        i += t.numel()
    return DiagGaussian._trusted(out_eta, out_prec)


def laplace_site(cavity: DiagGaussian, theta: Mapping[str, Tensor], curvature: Mapping[str, Tensor]) -> DiagGaussian:
    r"""The site :math:`q_k / q_{-k}` of the local Laplace posterior :math:`q_k = N(\theta, (\Lambda_{-k} + C)^{-1})`:
    precision ``C`` (the curvature, >= 0) and :math:`\eta = (\Lambda_{-k} + C)\theta - \eta_{-k}`."""
    prec_c = cavity.precision
    theta = {n: theta[n].to(prec_c[n]) for n in prec_c}
    curv = DiagGaussian.from_mean_precision(theta, {n: curvature[n].to(prec_c[n]) for n in prec_c})
    return _laplace_site(cavity, curv, theta)


def _cavity(posterior: DiagGaussian, site: DiagGaussian, floor: DiagGaussian) -> DiagGaussian:
    """``posterior / site`` with the precision floored at ``floor``'s (true value: >= the task prior's; the floor
    only removes float rounding of the subtraction)."""
    eta, prec = posterior.eta, posterior.precision
    s_eta, s_prec, f_prec = site.eta, site.precision, floor.precision
    return DiagGaussian._trusted({n: eta[n] - s_eta[n] for n in eta},
                                 {n: torch.maximum(prec[n] - s_prec[n], f_prec[n]) for n in prec})


def _batch_size(batch: Any) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(x.shape[0]) if isinstance(x, Tensor) and x.dim() > 0 else 1


def _task_index(name: str) -> int | None:
    m = re.match(r"task-(\d+)(/|$)", name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------- the strategy
class PosteriorServerStrategy(DDPStrategy):
    """Lightning strategy: workers keep sites of one shared diagonal Gaussian posterior (module docstring).

    Use as ``Trainer(strategy=PosteriorServerStrategy(sync_every=10), accelerator="cpu", devices=2)``; processes
    are launched as by ``strategy="ddp"`` (the script is re-run per rank; ``torchrun`` and SLURM work through
    Lightning's cluster environments).

    Args:
        sync_every: ``K``, optimizer steps between two site updates (each one all-reduce of ``2P`` floats).
        damping: ``δ ∈ (0, 1]`` of the site update; ``None`` = ``1 / world_size``.
        prior: the posterior to start from: ``None`` (``N(0, I/prior_precision)``), a :class:`DiagGaussian`
            (e.g. the previous task's :meth:`posterior`) or a :class:`PosteriorServer` (its sites are kept).
        prior_precision: base prior precision, also given to parameters absent from ``prior``.
        fisher: ``"mc"``, ``"exact"`` or ``"empirical"`` (see :mod:`bayescl.curvature.diag`).
        fisher_batches: at most this many of the last training batches are used for the Fisher at a sync.
        mc_samples: sampled labels per example for ``fisher="mc"``.
        recenter: restart every worker from the global mean after each sync.
        params: regular expressions selecting the parameters with a posterior (``None`` = all trainable).
        num_examples: the shard size ``N_k`` (default: the length of the training sampler on this rank).
        auto_end_task: close the task (:meth:`end_task`) at the end of every ``fit``.
        gather_sites: at the end of a task, all-gather the worker sites (one site per (task, worker), ``W × 2P``
            floats); ``False`` keeps the task's total as one site ``task-t`` (no communication: every rank already
            holds it).
        seed: seeds the Monte Carlo labels (with the rank and the sync index).
        timeout: timeout of every collective; a worker that dies or stalls makes the others fail after it.
        process_group_backend: ``None`` picks gloo on CPU, nccl on CUDA.
        start_method: as :class:`~pytorch_lightning.strategies.DDPStrategy` (``"popen"`` re-runs the script).
    """

    strategy_name = "posterior_server"

    def __init__(
        self,
        sync_every: int = 10,
        damping: float | None = None,
        prior: DiagGaussian | PosteriorServer | None = None,
        prior_precision: float = 1e-4,
        fisher: str | FisherType = FisherType.MC,
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
        self.sync_every = check_positive_int(sync_every, "sync_every")
        self.damping = None if damping is None else check_real(damping, "damping", low=0.0, high=1.0, low_open=True)
        self.prior_precision = check_real(prior_precision, "prior_precision", low=0.0, low_open=True)
        self.fisher = as_enum(FisherType, fisher, "fisher")
        if self.fisher is FisherType.BATCH_SQUARED:
            raise ValueError("fisher='batch_squared' is not valid here; allowed: 'mc', 'exact', 'empirical'.")
        self.fisher_batches = check_positive_int(fisher_batches, "fisher_batches")
        self.mc_samples = check_positive_int(mc_samples, "mc_samples")
        self.recenter = bool(recenter)
        if params is not None and (isinstance(params, str) or not all(isinstance(p, str) for p in params)):
            raise TypeError(f"params must be a list of regular expressions (str) or None, got {params!r}.")
        self.param_patterns = None if params is None else [re.compile(p) for p in params]
        self.num_examples = None if num_examples is None else check_positive_int(num_examples, "num_examples")
        self.auto_end_task = bool(auto_end_task)
        self.gather_sites = bool(gather_sites)
        self.seed = int(seed)
        if prior is not None and not isinstance(prior, (DiagGaussian, PosteriorServer)):
            raise TypeError(f"prior must be None, a DiagGaussian or a PosteriorServer, got {type(prior).__name__}.")
        if isinstance(prior, PosteriorServer) and not isinstance(prior.prior, DiagGaussian):
            raise TypeError("prior must hold DiagGaussian sites; this strategy is diagonal only.")
        self._initial_prior = prior
        #: the (task, worker) sites; identical on every rank after :meth:`end_task`
        self.server: PosteriorServer | None = None
        #: this worker's site of the current task (natural parameters)
        self.local_site: DiagGaussian | None = None
        self.tasks_seen = 0
        self.num_syncs = 0
        self.bytes_communicated = 0
        self.bytes_gathered = 0
        #: max |η, λ| difference between the running posterior and prior × Σ gathered sites at the last end_task
        self.last_gather_drift = 0.0
        self._steps_since_sync = 0
        self._shard_size: int | None = None
        self._buffer: deque[Any] = deque(maxlen=self.fisher_batches)
        self._task_floor: DiagGaussian | None = None
        self._task_syncs = 0

    # ------------------------------------------------------------------ no DDP wrapper
    def configure_ddp(self) -> None:
        """No ``DistributedDataParallel``: broadcast rank 0's weights once, as DDP does at wrapping, then train
        locally."""
        assert self.model is not None
        if dist.is_available() and dist.is_initialized():
            _sync_module_states(self.model)

    @property
    def world(self) -> int:
        return int(self.world_size)

    @property
    def site_names(self) -> tuple[str, str]:
        """``(this worker's site, the current task's total)`` names for the current task."""
        return f"task-{self.tasks_seen}/worker-{self.global_rank}", f"task-{self.tasks_seen}/total"

    # ------------------------------------------------------------------ parameters and server
    def selected_params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        out = {n: p for n, p in module.named_parameters()
               if p.requires_grad and (self.param_patterns is None or any(r.search(n) for r in self.param_patterns))}
        if not out:
            pats = [r.pattern for r in self.param_patterns or []]
            raise ValueError(f"params={pats} selects no trainable parameter of {type(module).__name__}.")
        return out

    def _ensure_server(self, module: nn.Module) -> PosteriorServer:
        params = {n: p.detach() for n, p in self.selected_params(module).items()}
        if self.server is None:
            init = self._initial_prior
            if isinstance(init, PosteriorServer):
                self.server = PosteriorServer.from_state_dict(init.state_dict())
                done = [t for t in map(_task_index, self.server.names) if t is not None]
                self.tasks_seen = max(done) + 1 if done else 0
            else:
                base = init if init is not None else DiagGaussian.isotropic(params, self.prior_precision)
                self.server = PosteriorServer(base)
        new = {n: p for n, p in params.items() if n not in self.server.prior}
        if new:
            self.server.extend_prior(new, self.prior_precision)
        names = [n for n in self.server.prior.names if n in params]
        if set(names) != set(self.server.prior.names):
            missing = [n for n in self.server.prior.names if n not in params]
            raise ValueError(f"the prior holds parameters the module does not select: {missing[:3]}; "
                             "select the same parameters (params=...) in every task.")
        return self.server

    def posterior(self) -> DiagGaussian:
        """The global posterior ``prior × Π sites`` (identical on every rank after a sync)."""
        if self.server is None:
            raise RuntimeError("no posterior yet: the strategy has not run a fit.")
        return self.server.posterior()

    def cavity(self) -> DiagGaussian:
        """``q / λ_k`` of this worker for the current task (the prior it trains against)."""
        q = self.posterior()
        if self.local_site is None:
            return q
        floor = self._task_floor if self._task_floor is not None else self.server.prior
        return _cavity(q, self.local_site, floor)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        from bayescl.lightning.base import PosteriorCallback

        clash = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, PosteriorCallback)]
        if clash:
            raise ValueError(f"PosteriorServerStrategy adds the posterior term itself; remove the callbacks {clash} "
                             "(they would add a second prior term).")
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            raise ValueError("PosteriorServerStrategy does not support precision='16-mixed' with a GradScaler; "
                             "use '32-true', '64-true' or 'bf16-mixed'.")
        server = self._ensure_server(self.lightning_module)
        _, total = self.site_names
        if total not in server:
            empty = DiagGaussian.zeros_like(server.prior.eta)
            self._task_floor = server.posterior()  # the prior of this task: the cavity is never below it
            server.add(total, empty)
            self.local_site = empty
            self._task_syncs = 0
        elif self.local_site is None:
            raise RuntimeError(f"site {total!r} exists but this worker's own site is unknown; resume is unsupported.")
        self._steps_since_sync = 0
        self._buffer.clear()

    def on_train_start(self) -> None:
        super().on_train_start()
        n = self.num_examples
        if n is None:
            n = _shard_size(self.lightning_module.trainer, self.world)
        self._shard_size = max(1, int(n))

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        if batch is not None:
            self._buffer.append(batch)
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
    @torch.no_grad()
    def add_cavity_grad(self, module: nn.Module) -> None:
        """``p.grad += (Λ_{-k} θ − η_{-k}) / N_k`` for every selected parameter."""
        if self.server is None or self._cavity_is_base_prior():
            return
        params = self.selected_params(module)
        grads = self.cavity().quadratic_grad({n: p.detach() for n, p in params.items()})
        add_scaled_grads(params, grads, 1.0 / float(self._shard_size or 1))

    #: apply the term when the cavity is the base prior alone (first task, before any other worker's site has
    #: arrived; with one worker, the whole first task): a weak weight decay, off by default as in the callbacks
    penalise_prior_alone = False

    def _cavity_is_base_prior(self) -> bool:
        if self.penalise_prior_alone or self._initial_prior is not None:
            return False
        _, total = self.site_names
        return all(n == total for n in self.server.names) and (self.world == 1 or self._task_syncs == 0)

    def _damping(self) -> float:
        return self.damping if self.damping is not None else 1.0 / self.world

    def local_curvature(self, module: nn.Module) -> dict[str, Tensor]:
        """``N_k / n_b ×`` the summed diagonal Fisher over the buffered batches (``n_b`` examples)."""
        batches = list(self._buffer)
        if not batches:
            raise RuntimeError("no training batch since the last sync; cannot estimate the curvature.")
        params = self.selected_params(module)
        ref = next(iter(params.values()))
        g = torch.Generator(device=ref.device).manual_seed(self.seed + 1_000_003 * self.global_rank + self.num_syncs)
        with torch.enable_grad(), torch.inference_mode(False):
            fisher = diag_fisher(module, batches, fisher=self.fisher, params=list(params), generator=g,
                                 mc_samples=self.mc_samples if self.fisher is FisherType.MC else 1)
        scale = float(self._shard_size or 1) / sum(_batch_size(b) for b in batches)
        return {n: f * scale for n, f in fisher.items()}

    @torch.no_grad()
    def sync(self) -> DiagGaussian:
        """One synchronous round (collective: every rank must call it): new local site, damped, one
        ``all_reduce`` of its natural-parameter change; returns the new global posterior."""
        module = self.lightning_module
        server = self.server
        assert server is not None and self.local_site is not None
        params = self.selected_params(module)
        theta = {n: p.detach().clone() for n, p in params.items()}
        cavity = self.cavity()
        new = laplace_site(cavity, theta, self.local_curvature(module))
        d = self._damping()
        old = self.local_site
        updated = new if d == 1.0 else old.temper(1.0 - d) * new.temper(d)
        delta = flatten_naturals(updated) - flatten_naturals(old)
        total_delta = delta.clone().to(self.root_device)
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            dist.all_reduce(total_delta, op=dist.ReduceOp.SUM)
            self.bytes_communicated += delta.numel() * delta.element_size()
        _, total = self.site_names
        server.replace(total, unflatten_naturals(flatten_naturals(server[total]) + total_delta.to(delta), old))
        self.local_site = updated
        self.num_syncs += 1
        self._task_syncs += 1
        self._steps_since_sync = 0
        self._buffer.clear()
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
        """Close the current task (collective): gather every worker's site so that the server holds one site
        per (task, worker), identical on every rank; returns the global posterior (the next task's prior)."""
        server = self.server
        if server is None or self.local_site is None:
            raise RuntimeError("end_task needs a running task: call it after a fit with this strategy.")
        _, total = self.site_names
        running = server.posterior()
        if not self.gather_sites:
            server.add(f"task-{self.tasks_seen}", server.remove(total))
            return self._close_task(running)
        vec = flatten_naturals(self.local_site).to(self.root_device)
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            parts = [torch.empty_like(vec) for _ in range(self.world)]
            dist.all_gather(parts, vec)
            self.bytes_gathered += vec.numel() * vec.element_size() * self.world
        else:
            parts = [vec]
        server.remove(total)
        dtype = next(iter(self.local_site.eta.values())).dtype
        for j, part in enumerate(parts):
            server.add(f"task-{self.tasks_seen}/worker-{j}", unflatten_naturals(part.to(dtype), self.local_site))
        return self._close_task(running)

    def _close_task(self, running: DiagGaussian) -> DiagGaussian:
        q = self.server.posterior()
        self.last_gather_drift = float((flatten_naturals(q) - flatten_naturals(running)).abs().max())
        self.tasks_seen += 1
        self.local_site = None
        self._task_floor = None
        if self.recenter and self.lightning_module is not None:
            self._load_mean(self.lightning_module, q)
        return q

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks and logs."""
        return {"num_syncs": self.num_syncs, "bytes_communicated": self.bytes_communicated,
                "bytes_gathered": self.bytes_gathered, "tasks_seen": self.tasks_seen, "world_size": self.world,
                "damping": self._damping(), "sync_every": self.sync_every,
                "last_gather_drift": self.last_gather_drift}


def _shard_size(trainer: pl.Trainer, world: int) -> int:
    """Examples this rank trains on per epoch: the length of its sampler, else the dataset size / world."""
    dl = trainer.train_dataloader
    sampler = getattr(dl, "sampler", None)
    try:
        if sampler is not None:
            return len(sampler)
    except TypeError:
        pass
    ds = getattr(dl, "dataset", None)
    try:
        if ds is not None:
            return max(1, len(ds) // max(1, world))
    except TypeError:
        pass
    bs = int(getattr(dl, "batch_size", 1) or 1)
    return int(trainer.num_training_batches) * bs
