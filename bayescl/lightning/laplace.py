r"""Online Laplace for an existing Lightning Trainer: diagonal (online EWC) and Kronecker-factored.

At the end of every task's ``fit`` the curvature at the optimum :math:`\theta^*_t` over that task's training
data (:math:`N_t F_t`, a summed Fisher: diagonal or KFAC) updates the posterior

.. math::

    \Lambda_t = \gamma\,\Lambda_{t-1} + \lambda\, N_t F_t, \qquad \mu_t = \theta^*_t

(Ritter et al. 2018; Schwarz et al. 2018 for the decay :math:`\gamma`; :math:`\lambda = \gamma = 1` is the plain
Bayesian recursion), and :math:`q_t = \mathcal N(\mu_t, \Lambda_t^{-1})` is the prior of the next task, whose
term :math:`\frac{1}{2N}(\theta-\mu_t)^\top\Lambda_t(\theta-\mu_t)` is added to the gradients (see
:mod:`bayescl.lightning.base`).

In the posterior server the new task's site is :math:`t_t = q_t / q_{t-1}` (the curvature terms, and the
natural mean shift that re-centres the posterior on :math:`\theta^*_t`), so ``prior × Π sites`` is exactly the
online-Laplace posterior. ``forget(t)`` removes a site: removing the *latest* task gives back exactly the posterior
before it; removing an earlier one removes its curvature exactly, while the mean keeps what later optima learnt.

With ``structure="kron"`` the per-layer precision is a sum of Kronecker products, one per task (exact, memory and
prior-gradient cost grow with the tasks). ``online=True`` keeps one site: the diagonal sum is exact; for kron the
sum is replaced by its nearest single Kronecker pair after every task (``KronGaussian.merge``, an approximation,
constant memory and cost) — the recipes say which they use.

Under Lightning DDP (``strategy="ddp"``, or ``"ddp_find_unused_parameters_true"`` for a multi-head model) every
rank holds the same posterior: :math:`N_t` is the global task size (``len`` of the training loader's dataset, the
whole task on every rank), and the curvature pass splits that dataset between the ranks (indices
``rank::world_size``, each example once, not the padded shards of ``DistributedSampler``) and all-reduces the sums
(diagonal Fisher; KFAC's ``Σ ã ãᵀ``, ``G`` and the example count), so every rank adds the same site
(:mod:`bayescl.lightning.distributed`). Every rank must reach the end of the task: the pass is a collective.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

from bayescl._checks import as_enum, check_bool, check_positive_int, check_real
from bayescl.curvature import FisherType
from bayescl.gaussian import Gaussian, laplace_site, normalizing_factor
from bayescl.lightning.base import PosteriorCallback
from bayescl.lightning.distributed import is_distributed, rank_and_world, rank_share, sum_across_ranks
from bayescl.lightning.structure import Structure, builders_for
from bayescl.lightning.vcl_noise import mix
from bayescl.methods.marglik import fit_prior_precision, with_prior_precision

__all__ = ["LaplaceCallback", "Structure"]


def _shows_progress(trainer: pl.Trainer | None) -> bool:
    """Whether the end-of-task pass shows a progress bar: when the Trainer shows one (rank 0 only)."""
    return trainer is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero


def _is_finite(g: Gaussian) -> str | None:
    for n, t in g.eta.items():
        if not bool(torch.isfinite(t).all()):
            return n
    return None


class LaplaceCallback(PosteriorCallback):
    r"""Online Laplace posterior over the weights of the LightningModule it is attached to.

    The module's ``forward`` is used for the curvature pass: it must map a batch's inputs (``x`` or
    ``x, task_id``, see :mod:`bayescl._batches`) to logits.

    Args:
        structure: ``"diag"`` or ``"kron"`` (Linear/Conv2d layers; other parameters get a diagonal).
        fisher: ``"mc"`` (labels sampled from the model), ``"exact"``, ``"empirical"`` or (diag only)
            ``"batch_squared"`` (Avalanche's EWC estimate, for comparison).
        prior_precision: base prior ``N(0, I/prior_precision)``.
        lam: multiplier :math:`\lambda > 0` of each task's curvature (Ritter et al.); with ``normalize`` (the default)
            the mean precision a task adds per weight and per training example. 1 with ``normalize=False`` is the
            Bayesian value, but it holds old tasks too weakly. The default 0.01 was chosen on validation data over
            split-MNIST task-IL, split-MNIST domain-IL and permuted MNIST (``benchmarks/results/defaults``,
            docs/defaults.md).
        normalize: divide each task's curvature :math:`\sum_n F_n` (summed over its :math:`N_t` examples) by its
            mean per example :math:`\bar F = \operatorname{mean}(\sum_n F_n) / N_t` over the weights the task
            touches (:func:`~bayescl.gaussian.kinds.normalizing_factor`) before ``lam`` multiplies it. The site keeps
            the Bayesian growth with :math:`N_t` but loses the scale of :math:`\bar F`, which follows how confidently
            the network fits the task, not how much the task matters: after training, :math:`\bar F` is
            :math:`4 \cdot 10^{-7}` per weight on split MNIST's first task and :math:`5 \cdot 10^{-4}` on
            permuted MNIST's (``benchmarks/diagnostics/fisher_scale.py``), so a ``lam`` on the raw curvature means
            a thousand times more on one than on the other. ``False``: the curvature as computed.
        temperature: :math:`T > 0`: the curvature is that of the tempered likelihood :math:`\operatorname{softmax}(f/T)`,
            which a confident optimum does not flatten to zero
            (:func:`~bayescl.curvature.common.check_temperature`); 1: the model's own likelihood.
        gamma: online decay :math:`\gamma \in (0, 1]` of the earlier precision (online EWC); 1 = pure sum.
        online: keep a single site (constant memory; for kron an approximation, see the module docstring).
        rank: kron only: keep the top ``rank`` eigen-directions of every Kronecker factor
            (:meth:`~bayescl.gaussian.kron.KronGaussian.low_rank`, an approximation that makes the prior gradient cheap);
            ``None`` keeps the full factors.
        rank_diagonal: with ``rank``, each factor also keeps the diagonal of what the rank cuts
            (``A ≈ U_A U_Aᵀ + diag(A − U_A U_Aᵀ)``): every weight keeps curvature, at twice the low-rank cost.
        params: regular expressions selecting the parameters with a posterior (``None`` = all trainable).
        mc_samples: sampled labels per example for ``fisher="mc"``.
        dataloader: data for the curvature pass (default: the fit's training dataloader).
        curvature_batch_size: re-batch the curvature pass's dataset (unshuffled) at this size; larger batches make
            the pass cheaper per example (the Fisher is a sum over examples, so the result does not depend on it,
            up to the Monte Carlo labels). ``None`` uses the dataloader as it is.
        max_batches: cap on the batches of the curvature pass.
        auto_end_task: close the task at the end of every ``fit`` (else call :meth:`end_task`).
        predictive_prior_precision: base prior precision of :meth:`predictive_posterior` (the posterior used for
            prediction and uncertainty): ``"marglik"`` fits it by the Laplace evidence after every task
            (:mod:`bayescl.methods.marglik`), ``"train"`` keeps ``prior_precision``, a number uses that value. Training
            is not affected. ``laplace/penalty`` is logged every ``trainer.log_every_n_steps`` steps.
        seed: seeds the Monte Carlo labels of the curvature pass.
        state_key_suffix: distinguishes two instances of the same structure on one Trainer.
        num_examples: :math:`N_t` for training data without a length (an ``IterableDataset``).
        batchnorm: ``"freeze"`` (BatchNorm running statistics fixed after the first task) or ``"train"``.
    """

    prefix = "bayescl-laplace"

    def __init__(
        self,
        structure: str | Structure = Structure.DIAG,
        fisher: str | FisherType = FisherType.MC,
        prior_precision: float = 1e-4,
        lam: float = 0.01,
        normalize: bool = True,
        temperature: float = 1.0,
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
        predictive_prior_precision: float | str = "marglik",
        seed: int = 0,
        state_key_suffix: str = "",
        num_examples: int | None = None,
        batchnorm: str = "freeze",
    ) -> None:
        super().__init__(prior_precision=prior_precision, params=params, state_key_suffix=state_key_suffix,
                         num_examples=num_examples, batchnorm=batchnorm)
        if isinstance(predictive_prior_precision, str):
            if predictive_prior_precision not in ("marglik", "train"):
                raise ValueError(f"predictive_prior_precision={predictive_prior_precision!r} is not valid; allowed: "
                                 "'marglik', 'train' or a positive number.")
        else:
            check_real(predictive_prior_precision, "predictive_prior_precision", low=0.0, low_open=True)
        self.predictive_prior_precision = predictive_prior_precision
        self._predictive: tuple[Gaussian, Gaussian, float] | None = None
        #: site names after an end_task -> its θ*, the posterior's mean by construction (see :meth:`posterior`)
        self._centres: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        self._centred_cache: tuple[Gaussian, Gaussian] | None = None
        #: the structure resolved once to how it builds the prior, a task's site and the online merge
        self.builders = builders_for(structure)
        self.structure = self.builders.structure
        self.fisher = as_enum(FisherType, fisher, "fisher")
        if self.fisher not in self.builders.fishers:
            allowed = ", ".join(repr(f.value) for f in self.builders.fishers)
            raise ValueError(f"fisher={self.fisher.value!r} is not available with structure="
                             f"{self.structure.value!r}; allowed: {allowed}.")
        self.lam = check_real(lam, "lam", low=0.0, low_open=True)
        self.normalize = check_bool(normalize, "normalize")
        self.temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
        self.gamma = check_real(gamma, "gamma", low=0.0, high=1.0, low_open=True)
        self.online = bool(online)
        if rank is not None and self.builders.low_rank is None:
            raise ValueError(f"rank={rank} applies to structure='kron' only; got structure={self.structure.value!r}.")
        self.rank = None if rank is None else check_positive_int(rank, "rank")
        if rank_diagonal and self.rank is None:
            raise ValueError("rank_diagonal=True needs a rank (it keeps the diagonal of what the rank cuts).")
        self.rank_diagonal = bool(rank_diagonal)
        self.mc_samples = check_positive_int(mc_samples, "mc_samples")
        self.dataloader = dataloader
        self.curvature_batch_size = (None if curvature_batch_size is None
                                     else check_positive_int(curvature_batch_size, "curvature_batch_size"))
        self.max_batches = None if max_batches is None else check_positive_int(max_batches, "max_batches")
        self.auto_end_task = bool(auto_end_task)
        self.seed = int(seed)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(structure=self.structure.value, suffix=self._suffix)

    # ------------------------------------------------------------------ posterior construction
    def make_prior(self, pl_module: nn.Module) -> Gaussian:
        """The base prior ``N(0, I/prior_precision)`` over the selected parameters, in this structure."""
        return self.builders.prior(pl_module, self.selected_params(pl_module), self.prior_precision)

    def curvature_site(self, pl_module: nn.Module, dataloader: Iterable[Any],
                       params: dict[str, nn.Parameter] | None = None, progress: bool = False) -> Gaussian:
        """The curvature at the current weights as a site (precision ``N_t F_t``) over ``params`` (default: the
        selected parameters); ``progress`` shows a progress bar over the pass.

        Under DDP ``dataloader`` is this rank's share of the task (:meth:`_curvature_data`): the sums are
        all-reduced, so every rank returns the same site (its Monte Carlo labels are seeded per rank).
        """
        params = self.selected_params(pl_module) if params is None else params
        rank, world = rank_and_world()
        seed = self.seed + self.tasks_seen if world == 1 else mix(self.seed, self.tasks_seen, rank)
        g = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
        return self.builders.site(pl_module, dataloader, params=list(params), fisher=self.fisher,
                                  mc_samples=self.mc_samples if self.fisher is FisherType.MC else 1,
                                  generator=g, max_batches=self.max_batches, progress=progress,
                                  reduce=sum_across_ranks if world > 1 else None, temperature=self.temperature)

    def _low_rank(self, g: Gaussian) -> Gaussian:
        """The one place where ``rank`` / ``rank_diagonal`` are applied (``g`` unchanged without a rank)."""
        return g if self.rank is None else self.builders.low_rank(g, self.rank, self.rank_diagonal)

    def _curvature_data(self, trainer: pl.Trainer | None, dataloader: Iterable[Any] | None) -> Iterable[Any]:
        data = dataloader if dataloader is not None else self.dataloader
        if data is None and trainer is not None:
            data = trainer.train_dataloader
        if data is None:
            raise ValueError("end_task needs a dataloader (none given and the trainer has no train_dataloader).")
        if is_distributed():  # each rank sums over indices rank::world_size of the whole task, counted once
            return rank_share(data, self.curvature_batch_size)
        if self.curvature_batch_size is not None and getattr(data, "dataset", None) is not None:
            data = DataLoader(data.dataset, batch_size=self.curvature_batch_size, shuffle=False)
        return data

    def end_task(self, trainer: pl.Trainer | None, pl_module: nn.Module, dataloader: Iterable[Any] | None = None,
                 name: str | None = None) -> Gaussian:
        r"""Close a task: curvature at the current weights becomes a site; returns the new posterior.

        With :math:`C_t = \lambda N_t F_t` the tempered curvature: ``online=False`` adds the site
        :math:`q_t / q_{t-1}` with :math:`q_t = \mathcal N(\theta^*, (\Lambda_{t-1} + C_t)^{-1})` (earlier sites
        tempered by :math:`\gamma`, ``C_t`` truncated to ``rank``); ``online=True`` replaces all sites by one,
        :math:`q_t / p_0` with :math:`q_t`'s precision merged (``structure``'s online merge) and truncated.
        The previous posterior is kept, bit for bit, if anything fails.

        Args:
            trainer: supplies ``train_dataloader`` when neither ``dataloader`` nor the constructor's is given.
            pl_module: the model at the task's optimum.
            dataloader: data of the curvature pass.
            name: the site's name (default ``task-<index>``; ignored with ``online=True``).

        Raises:
            ValueError: no dataloader, an empty one, or a non-finite curvature.
        """
        self.check_manual_commit(trainer)
        server = self.ensure_server(pl_module)
        data = self._curvature_data(trainer, dataloader)
        params = self.selected_params(pl_module)
        for n, p in params.items():
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"parameter {n!r} is not finite (NaN/inf) after training, so the task has no curvature; the "
                                 "site is refused and the previous posterior kept (lower the learning rate or clip "
                                 "gradients, then refit the task).")
        theta = {n: p.detach().clone() for n, p in params.items()}
        t0 = time.perf_counter()
        with torch.enable_grad(), torch.inference_mode(False):
            curv = self.curvature_site(pl_module, data, params, progress=_shows_progress(trainer))
        self.end_task_seconds += time.perf_counter() - t0
        if (bad := _is_finite(curv)) is not None:
            raise ValueError(f"the curvature of parameter {bad!r} is not finite; the site is refused and the "
                             "previous posterior kept.")
        alpha = self.lam
        if self.normalize:
            factor = normalizing_factor(curv.precision_diagonal().values(), self.num_examples or 1)
            if factor > 0:
                alpha *= factor
            else:
                rank_zero_warn("normalize=True: the task's curvature is zero on every weight, so there is nothing to "
                               "normalise; the site adds no precision.")
        if alpha != 1.0:
            curv = curv.temper(alpha)
        old_sites = dict(server.items())
        try:
            if self.gamma != 1.0:
                for k, s in old_sites.items():
                    server.replace(k, s.temper(self.gamma))
            q_prev = server.posterior()
            if self.online:  # one site: the whole re-centred posterior over the prior (merged for kron)
                q_new = self._low_rank(self.builders.merge(q_prev * curv)).with_mean(theta)
                site = q_new.divide(server.prior, allow_improper=True)
                for k in list(server.names):
                    server.remove(k)
                server.add("online", site)
            else:
                server.add(name or f"task-{self.tasks_seen}", laplace_site(q_prev, self._low_rank(curv), theta))
        except Exception:
            for k in list(server.names):
                server.remove(k)
            for k, s in old_sites.items():
                server.add(k, s)
            raise
        self.tasks_seen += 1
        self.task_open, self.task_steps = False, 0
        self._grad_cache = None
        sites = tuple(str(k) for k in server.names)
        # earlier centres stay valid for forget() of the latest task (not after gamma tempered their sites)
        self._centres = {k: v for k, v in self._centres.items()
                         if self.gamma == 1.0 and k == sites[: len(k)] and k != sites}
        self._centres[sites] = theta
        return self.posterior()

    def posterior(self) -> Gaussian:
        r"""The current posterior (the prior of the next task), centred on the optimum :math:`\theta^*_t` of the
        :meth:`end_task` that left the present sites (its mean by construction, :func:`~bayescl.gaussian.laplace_site`;
        :meth:`forget` of the latest task goes back to the previous one), rather than on :math:`\Lambda^{-1}\eta`
        solved from the natural parameters. With a weak base prior and a strong curvature
        (``prior_precision=1e-4``, ``lam=100``: a Kronecker block's condition number is about 1e9) the float32
        ``η`` cannot hold the mean's components in the flat directions: the solved mean came out several times
        larger than the weights, which put every predictive at chance and made the evidence fit a far too small
        prior precision. After :meth:`forget` of an earlier task the solved mean is used (it then moves).
        """
        q = super().posterior()
        if self._centred_cache is None or self._centred_cache[0] is not q:
            self._centred_cache = (q, self._centred(q))
        return self._centred_cache[1]

    def _centred(self, q: Gaussian) -> Gaussian:
        """``q`` re-centred on the θ* of the end_task that left the present sites (else ``q``)."""
        theta = self._centres.get(tuple(str(k) for k in self.server.names)) if self.server is not None else None
        if theta is None:
            return q
        eta = q.eta
        missing = [n for n in q.names if n not in theta]  # parameters that appeared since (new heads)
        solved = q.mean if missing else {}
        return q.with_mean({n: (theta[n] if n in theta else solved[n]).to(eta[n]) for n in q.names})

    def predictive_posterior(self) -> Gaussian:
        """The posterior with its base prior precision replaced for prediction (``predictive_prior_precision``;
        cached per posterior). Same mean and data curvature as :meth:`posterior`."""
        q = self.posterior()
        if self._predictive is not None and self._predictive[0] is q:
            return self._predictive[1]
        mode = self.predictive_prior_precision
        if mode == "train":
            tau = self.prior_precision
        elif mode == "marglik":
            tau = fit_prior_precision(q, self.prior_precision)
        else:
            tau = float(mode)
        qp = q if tau == self.prior_precision else with_prior_precision(q, self.prior_precision, tau)
        self._predictive = (q, qp, tau)
        return qp

    @property
    def fitted_prior_precision(self) -> float | None:
        """The base prior precision of the last :meth:`predictive_posterior` (``None`` before the first)."""
        return None if self._predictive is None else self._predictive[2]

    def forget(self, task: int | str) -> Gaussian:
        if self.online:
            raise ValueError("forget() needs one site per task; this callback has online=True (a single site).")
        return super().forget(task)

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.server is None or len(self.server) == 0:
            return
        if (trainer.global_step % max(1, trainer.log_every_n_steps)) == 0 and trainer.logger is not None:
            pl_module.log("laplace/penalty", self.penalty(pl_module), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.auto_commit(trainer, pl_module)

    def reset(self) -> None:
        super().reset()
        self._centres, self._centred_cache, self._predictive = {}, None, None

    def state_dict(self) -> dict[str, Any]:
        # the centres (θ* per end_task, see posterior) survive a resume; plain lists of (sites, tensors)
        return {**super().state_dict(), "structure": self.structure.value, "online": self.online,
                "centres": [(list(k), dict(v)) for k, v in self._centres.items()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._centres = {tuple(k): dict(v) for k, v in state_dict.get("centres", [])}
        self._centred_cache, self._predictive = None, None

