"""The Lightning adapters: the callbacks added to a user's Trainer (weight-space posteriors, a prior on functions,
experience replay), the posterior-server distribution strategy, a
train loader Lightning resumes exactly, and the helper that says which task a checkpoint resumes."""

from bayescl.lightning.base import PosteriorCallback
from bayescl.lightning.functional import FunctionalPriorCallback
from bayescl.lightning.laplace import LaplaceCallback, Structure
from bayescl.lightning.replay import ReplayCallback
from bayescl.lightning.resumable import ResumableDataLoader
from bayescl.lightning.resume import ResumePoint, resume_point
from bayescl.lightning.strategy import PosteriorServerStrategy
from bayescl.lightning.vcl import VCLCallback

__all__ = ["FunctionalPriorCallback", "LaplaceCallback", "PosteriorCallback", "PosteriorServerStrategy", "ReplayCallback",
           "ResumableDataLoader", "ResumePoint", "Structure", "VCLCallback", "resume_point"]
