"""Gaussians over named parameters in natural parameters (diagonal, Kronecker-factored), the posterior server that
holds a prior times one site per task or worker, and the fused prior gradient. Pure torch."""

from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kinds import (
    Gaussian,
    check_gaussian,
    gaussian_from_state_dict,
    mean_precision,
    normalizing_factor,
)
from bayescl.gaussian.kron import KronGaussian
from bayescl.gaussian.kron_block import BlockFactor, KronBlock
from bayescl.gaussian.kron_terms import KronTerm
from bayescl.gaussian.prior_gradient import PriorGradient
from bayescl.gaussian.server import PosteriorServer, laplace_site
from bayescl.gaussian.tensors import MeanInit

__all__ = ["BlockFactor", "DiagGaussian", "Gaussian", "KronBlock", "KronGaussian", "KronTerm", "MeanInit",
           "PosteriorServer", "PriorGradient", "check_gaussian", "gaussian_from_state_dict", "laplace_site",
           "mean_precision", "normalizing_factor"]
