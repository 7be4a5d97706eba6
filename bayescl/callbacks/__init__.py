"""Lightning callbacks: each adapts the posterior core to a Trainer."""

from .base import PosteriorCallback
from .laplace import LaplaceCallback, Structure

__all__ = ["LaplaceCallback", "PosteriorCallback", "Structure"]
