r"""Laplace sites from curvature: the curvature at the current weights as a Gaussian over the same parameters.

A site has precision :math:`\Lambda = \sum_n F_n` (the curvature summed over the data, see
:mod:`bayescl.curvature.diag` and :mod:`bayescl.curvature.kfac`) and natural mean :math:`\eta = \Lambda\theta^*`
at the current weights :math:`\theta^*`; both functions compute it for the selected parameters only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bayescl._params import linear_layers, require_layers, select_params
from bayescl.curvature.common import FisherType, LossType
from bayescl.curvature.diag import diag_fisher
from bayescl.curvature.kfac import KFACApprox, kfac_for_layers
from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kron import KronGaussian


def diag_site(model: nn.Module, dataloader: Iterable[Any], **kwargs: Any) -> DiagGaussian:
    r"""Laplace site with diagonal precision: :math:`\Lambda = \sum_n \operatorname{diag}F_n`,
    :math:`\eta = \Lambda\odot\theta^*` at the current weights.

    Keyword arguments go to :func:`diag_fisher` (``params`` selects the parameters). Returns a
    :class:`bayescl.gaussian.diag.DiagGaussian` over the same parameter names.
    """
    precision = diag_fisher(model, dataloader, **kwargs)
    named = dict(model.named_parameters())
    mean = {n: named[n].detach().clone() for n in precision}
    return DiagGaussian.from_mean_precision(mean, precision)


def kron_site(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    fisher: str | FisherType = FisherType.MC,
    loss: str | LossType = LossType.CE,
    kfac_approx: str | KFACApprox = KFACApprox.EXPAND,
    mc_samples: int = 1,
    layers: Iterable[str] | None = None,
    params: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    temperature: float = 1.0,
) -> KronGaussian:
    r"""Laplace site with Kronecker-factored precision :math:`G\otimes A` per supported layer at the current
    weights, and the diagonal Fisher (same ``fisher`` type, a second pass) for every other selected parameter.

    Arguments as for :func:`~bayescl.curvature.kfac.kfac`: ``params`` (names; ``None`` = every trainable
    parameter) selects the parameters of the site, ``layers`` restricts the Kronecker blocks among them. Layer
    discovery runs once, and curvature is computed for the selected parameters only. ``reduce`` (e.g.
    :func:`bayescl.lightning.distributed.sum_across_ranks`) combines the sums of several processes, each over its
    own examples, in both passes. ``temperature`` tempers the likelihood of both passes
    (:func:`bayescl.curvature.common.check_temperature`).

    Returns:
        A :class:`bayescl.gaussian.kron.KronGaussian` over the selected parameters, in the model's order.
    """
    selected = select_params(model, params)
    mapping = linear_layers(model, selected, layers)
    require_layers(model, mapping, "KFAC")
    factors = kfac_for_layers(
        model, dataloader, mapping, fisher=fisher, loss=loss, kfac_approx=kfac_approx, mc_samples=mc_samples,
        generator=generator, max_batches=max_batches, progress=progress, reduce=reduce, temperature=temperature,
    )
    # a layer the data never reached (another task's head) has zero factors: it gets no term at all
    factors = {k: (A, G) for k, (A, G) in factors.items() if bool(A.abs().max() > 0) and bool(G.abs().max() > 0)}
    covered = {n for pair in mapping.values() for n in pair if n is not None}
    rest = [n for n in selected if n not in covered]
    diag = None
    if rest:
        diag = diag_fisher(
            model, dataloader, fisher=fisher, loss=loss, mc_samples=mc_samples, params=rest, generator=generator,
            max_batches=max_batches, progress=progress, reduce=reduce, temperature=temperature,
        )
    mean = {n: p.detach().clone() for n, p in selected.items()}
    return KronGaussian.from_factors(mean, factors, mapping, diag)
