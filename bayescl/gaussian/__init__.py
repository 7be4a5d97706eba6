"""Gaussians over named parameters in natural parameters (diagonal, Kronecker-factored), the posterior server that
holds a prior times one site per task or worker, and the fused prior gradient. Pure torch."""

from bayescl.gaussian.diag import DiagGaussian, MeanInit
from bayescl.gaussian.kinds import Gaussian, gaussian_from_state_dict
from bayescl.gaussian.kron import KronGaussian
from bayescl.gaussian.prior_gradient import PriorGradient
from bayescl.gaussian.server import PosteriorServer, laplace_site

__all__ = ["DiagGaussian", "Gaussian", "KronGaussian", "MeanInit", "PosteriorServer", "PriorGradient",
           "gaussian_from_state_dict", "laplace_site"]
