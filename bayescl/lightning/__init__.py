"""The Lightning adapters: the callbacks added to a user's Trainer and the posterior-server distribution strategy."""

from bayescl.lightning.base import PosteriorCallback
from bayescl.lightning.laplace import LaplaceCallback, Structure
from bayescl.lightning.strategy import PosteriorServerStrategy
from bayescl.lightning.vcl import VCLCallback

__all__ = ["LaplaceCallback", "PosteriorCallback", "PosteriorServerStrategy", "Structure", "VCLCallback"]
