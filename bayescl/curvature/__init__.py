"""Curvature of the negative log-likelihood (diagonal Fisher, KFAC through curvlinops) and the Laplace sites built
from it. Pure torch (curvlinops for KFAC)."""

from bayescl.curvature.common import FisherType, LossType
from bayescl.curvature.diag import diag_fisher
from bayescl.curvature.kfac import KFACApprox, kfac, kfac_for_layers
from bayescl.curvature.sites import diag_site, kron_site

__all__ = ["FisherType", "KFACApprox", "LossType", "diag_fisher", "diag_site", "kfac", "kfac_for_layers", "kron_site"]
