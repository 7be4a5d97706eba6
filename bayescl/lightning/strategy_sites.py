"""Helpers of :class:`~bayescl.lightning.strategy.PosteriorServerStrategy`: the flat natural-parameter vector, the
collectives it travels through (public ``torch.distributed`` calls, no-ops without a process group or with one
worker), the local Laplace site, and the sizes of a rank's batches and shard."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import move_data_to_device
from torch import Tensor, nn

from bayescl.curvature import FisherType, diag_fisher
from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kinds import normalizing_factor
from bayescl.gaussian.server import PosteriorServer
from bayescl.gaussian.server import laplace_site as _laplace_site

__all__ = ["all_gather", "all_gather_object", "all_reduce_sum", "batch_size", "broadcast_module", "check_server",
           "check_trainer", "flatten_naturals", "laplace_site", "shard_curvature", "shard_size", "start_server",
           "to_cpu", "to_device", "unflatten_naturals"]


def _distributed(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def all_reduce_sum(vec: Tensor, device: torch.device, world: int) -> Tensor:
    """``Σ_ranks vec``, reduced on ``device`` and returned like ``vec`` (a copy of ``vec`` when not distributed)."""
    if not _distributed(world):
        return vec.clone()
    out = vec.to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(vec)


def all_gather(vec: Tensor, device: torch.device, world: int) -> list[Tensor]:
    """``[vec of rank 0, …, vec of rank W−1]``, each like ``vec`` (``[vec]`` when not distributed)."""
    if not _distributed(world):
        return [vec]
    local = vec.to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return [p.to(vec) for p in parts]


def all_gather_object(obj: Any, world: int) -> list[Any]:
    """``[obj of rank 0, …, obj of rank W−1]`` of picklable objects (``dist.all_gather_object``; ``[obj]`` when not
    distributed). Tensors travel as pickles: put them on the CPU first (:func:`to_cpu`)."""
    if not _distributed(world):
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def to_cpu(data: Any) -> Any:
    """``data`` (a batch: tensors in tuples, lists, dicts) with every tensor moved to the CPU."""
    return move_data_to_device(data, torch.device("cpu"))


def to_device(data: Any, device: torch.device) -> Any:
    """``data`` with every tensor moved to ``device``."""
    return move_data_to_device(data, device)


@torch.no_grad()
def broadcast_module(module: nn.Module, world: int) -> None:
    """Copy rank 0's parameters and buffers to every rank (what ``DistributedDataParallel`` does when it wraps a
    module); nothing when not distributed."""
    if _distributed(world):
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def flatten_naturals(g: DiagGaussian) -> Tensor:
    """``[η_1, …, η_P, λ_1, …, λ_P]`` as one flat vector (parameter order of ``g.names``): what a worker puts into
    an all-reduce or an all-gather."""
    return torch.cat([t.reshape(-1) for t in g.eta.values()] + [t.reshape(-1) for t in g.precision.values()])


def unflatten_naturals(vec: Tensor, like: DiagGaussian) -> DiagGaussian:
    """Inverse of :func:`flatten_naturals`: a (possibly signed) :class:`DiagGaussian` with ``like``'s names and
    shapes.

    Raises:
        ValueError: ``vec`` does not hold ``2 × len(like)`` entries.
    """
    n = len(like)
    if vec.numel() != 2 * n:
        raise ValueError(f"vec has {vec.numel()} entries but a Gaussian over {n} scalars needs {2 * n}.")
    out_eta, out_prec, i = {}, {}, 0
    for name, t in like.eta.items():
        out_eta[name] = vec[i:i + t.numel()].view_as(t).clone()
        out_prec[name] = vec[n + i:n + i + t.numel()].view_as(t).clone()
        i += t.numel()
    return DiagGaussian(out_eta, out_prec, signed=True)


def laplace_site(cavity: DiagGaussian, theta: Mapping[str, Tensor], curvature: Mapping[str, Tensor]) -> DiagGaussian:
    r"""The site :math:`q_k / q_{-k}` of the local Laplace posterior :math:`q_k = N(\theta, (\Lambda_{-k} + C)^{-1})`:
    precision ``C`` (the curvature, ``>= 0``) and :math:`\eta = (\Lambda_{-k} + C)\theta - \eta_{-k}`
    (:func:`bayescl.gaussian.server.laplace_site` with the tensors moved to the cavity's dtype and device)."""
    prec_c = cavity.precision
    theta = {n: theta[n].to(prec_c[n]) for n in prec_c}
    curv = DiagGaussian.from_mean_precision(theta, {n: curvature[n].to(prec_c[n]) for n in prec_c})
    return _laplace_site(cavity, curv, theta)


def batch_size(batch: Any) -> int:
    """The number of examples of a batch ``x`` or ``(x, y, ...)`` (1 for a scalar or a non-tensor)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(x.shape[0]) if isinstance(x, Tensor) and x.dim() > 0 else 1


def shard_size(trainer: pl.Trainer, world: int) -> int:
    """Examples this rank trains on per epoch: the length of its sampler, else the dataset size / ``world``, else
    batches × batch size."""
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


def start_server(init: DiagGaussian | PosteriorServer | None, params: Mapping[str, Tensor],
                 prior_precision: float) -> PosteriorServer:
    """A new server from the strategy's ``prior``: a copy of a server (its sites kept), a server around a Gaussian,
    or around ``N(0, I / prior_precision)`` over ``params``."""
    if isinstance(init, PosteriorServer):
        return PosteriorServer.from_state_dict(init.state_dict())
    return PosteriorServer(init if init is not None else DiagGaussian.isotropic(params, prior_precision))


def check_server(server: PosteriorServer, params: Mapping[str, Tensor], prior_precision: float) -> PosteriorServer:
    """Give parameters new to ``server`` the base prior (heads that appear later); ``ValueError`` if the server
    holds parameters that ``params`` lacks."""
    new = {n: p for n, p in params.items() if n not in server.prior}
    if new:
        server.extend_prior(new, prior_precision)
    missing = [n for n in server.prior.names if n not in params]
    if missing:
        raise ValueError(f"the prior holds parameters the module does not select: {missing[:3]}; "
                         "select the same parameters (params=...) in every task.")
    return server


def shard_curvature(module: nn.Module, batches: list[Any], params: list[str], fisher: FisherType, mc_samples: int,
                    seed: int, shard: int, lam: float = 1.0, normalize: bool = False) -> dict[str, Tensor]:
    r"""``λ N_k / n_b ×`` the summed diagonal Fisher :math:`F` of ``params`` over ``batches`` (:math:`n_b`
    examples), i.e. the Fisher of the shard of ``shard = N_k`` examples estimated from the batches, times ``lam``;
    ``seed`` seeds the MC labels.

    With ``normalize``, as ``LaplaceCallback(normalize=True)``: the estimate is divided by its mean per example over
    the weights it touches, :math:`\bar F / n_b` (:func:`~bayescl.gaussian.kinds.normalizing_factor`), so the result is
    :math:`\lambda N_k F / \bar F` and its mean over the touched weights is :math:`\lambda N_k` (a zero Fisher
    stays zero)."""
    if not batches:
        raise RuntimeError("no training batch since the last sync; cannot estimate the curvature.")
    ref = dict(module.named_parameters())[params[0]]
    g = torch.Generator(device=ref.device).manual_seed(seed)
    with torch.enable_grad(), torch.inference_mode(False):
        f = diag_fisher(module, batches, fisher=fisher, params=params, generator=g,
                        mc_samples=mc_samples if fisher is FisherType.MC else 1)
    scale = lam * (normalizing_factor(f.values(), shard) if normalize
                   else float(shard) / sum(batch_size(b) for b in batches))
    return {n: v * scale for n, v in f.items()}


def check_trainer(trainer: Any, precision_plugin: Any) -> None:
    """Refuse, before a fit, what the strategy cannot run with: a :class:`~bayescl.lightning.base.PosteriorCallback`
    (a second prior term) or a ``GradScaler`` (the term would be added to scaled gradients)."""
    from bayescl.lightning.base import PosteriorCallback

    clash = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, PosteriorCallback)]
    if clash:
        raise ValueError(f"PosteriorServerStrategy adds the posterior term itself; remove the callbacks {clash} "
                         "(they would add a second prior term).")
    if getattr(precision_plugin, "scaler", None) is not None:
        raise ValueError("PosteriorServerStrategy does not support precision='16-mixed' with a GradScaler; "
                         "use '32-true', '64-true' or 'bf16-mixed'.")
