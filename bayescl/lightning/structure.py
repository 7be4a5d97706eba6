r"""The structure of a Laplace posterior's precision, resolved once to the functions that build it.

:class:`~bayescl.lightning.laplace.LaplaceCallback` takes ``structure="diag"`` or ``"kron"`` and looks it up here
once, in its constructor (as laplace-torch maps ``hessian_structure`` to a class); nothing else branches on the
structure. A :class:`StructureBuilders` record says how to build

* the **base prior** :math:`p_0 = \mathcal N(0, I/\tau)` over the selected parameters (kron: with the
  Linear/Conv2d layers among them as Kronecker blocks, discovered once when the prior is made);
* a task's **site** from the curvature at the current weights, :math:`\Lambda_t = \sum_n F_n` and
  :math:`\eta_t = \Lambda_t\theta^*` (:func:`~bayescl.curvature.diag_site`, :func:`~bayescl.curvature.kron_site`,
  both computed for the selected parameters only);
* the **online merge** of the running precision into one term per block: exact for a diagonal (the identity), the
  nearest single Kronecker pair for kron (:meth:`~bayescl.gaussian.kron.KronGaussian.merge`, an approximation);
* the **low-rank** truncation of the Kronecker factors (``None`` where the structure has none).

>>> builders_for("kron").structure
<Structure.KRON: 'kron'>
>>> builders_for(Structure.DIAG).low_rank is None
True
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayescl._checks import as_enum
from bayescl._params import linear_layers, require_layers
from bayescl.curvature import FisherType, diag_site, kron_site
from bayescl.gaussian import DiagGaussian, Gaussian, KronGaussian


class Structure(str, enum.Enum):
    """Structure of the precision: ``"diag"`` (one entry per weight) or ``"kron"`` (a Kronecker-factored block per
    Linear/Conv2d layer, a diagonal for the other parameters)."""

    DIAG = "diag"
    KRON = "kron"


@dataclass(frozen=True)
class StructureBuilders:
    """How one :class:`Structure` builds its Gaussians.

    Attributes:
        structure: the structure these functions build.
        prior: ``(model, params, precision) -> p0``, the isotropic zero-mean base prior over ``params``
            (selected parameters by name).
        site: ``(model, dataloader, *, params, fisher, mc_samples, generator, max_batches) -> site``, the
            curvature summed over the data at the current weights, centred on them.
        merge: the online merge of a posterior's precision into one term per block (``η`` is kept; re-centre with
            ``with_mean``).
        low_rank: ``(gaussian, rank, keep_diagonal) -> gaussian``, truncation of the factors, or ``None``.
        fishers: the Fisher estimators this structure allows.
    """

    structure: Structure
    prior: Callable[[nn.Module, Mapping[str, Tensor], float], Gaussian]
    site: Callable[..., Gaussian]
    merge: Callable[[Gaussian], Gaussian]
    low_rank: Callable[[Gaussian, int, bool], Gaussian] | None
    fishers: tuple[FisherType, ...]


def _diag_prior(model: nn.Module, params: Mapping[str, Tensor], precision: float) -> DiagGaussian:
    return DiagGaussian.isotropic({n: p.detach() for n, p in params.items()}, precision)


def _kron_prior(model: nn.Module, params: Mapping[str, Tensor], precision: float) -> KronGaussian:
    layers = linear_layers(model, params)
    require_layers(model, layers, "structure='kron' (among the selected parameters)")
    mean = {n: torch.zeros_like(p.detach()) for n, p in params.items()}
    return KronGaussian(mean, layers, None, {n: precision for n in params})


def _same(q: Gaussian) -> Gaussian:
    """A diagonal precision is one term per weight already: the online merge is exact, nothing to do."""
    return q


BUILDERS: dict[Structure, StructureBuilders] = {
    Structure.DIAG: StructureBuilders(Structure.DIAG, _diag_prior, diag_site, _same, None, tuple(FisherType)),
    Structure.KRON: StructureBuilders(
        Structure.KRON, _kron_prior, kron_site, KronGaussian.merge, KronGaussian.low_rank,
        (FisherType.MC, FisherType.EXACT, FisherType.EMPIRICAL),
    ),
}


def builders_for(structure: str | Structure) -> StructureBuilders:
    """The builders of ``structure`` (``"diag"`` or ``"kron"``; ``ValueError`` naming ``structure`` otherwise)."""
    return BUILDERS[as_enum(Structure, structure, "structure")]
