"""bayescl: Bayesian continual learning for PyTorch Lightning."""

from .callbacks.laplace import LaplaceCallback, Structure
from .callbacks.vcl import VCLCallback
from .coresets import split_coreset
from .data import Scenario, Task, TaskStream, make_stream, permuted_stream, split_stream, synthetic_stream
from .kron import KronGaussian
from .metrics import AccuracyMatrix, average_accuracy, backward_transfer, forgetting
from .models import MLP, MultiHeadMLP, SmallCNN
from .module import ClassifierModule
from .posterior import DiagGaussian
from .sites import PosteriorServer
from .strategy import PosteriorServerStrategy

__all__ = [
    # callbacks
    "LaplaceCallback", "Structure", "VCLCallback", "split_coreset",
    # distributed training (a Lightning Strategy)
    "PosteriorServerStrategy",
    # posterior core
    "DiagGaussian", "KronGaussian", "PosteriorServer",
    # data
    "Scenario", "Task", "TaskStream", "make_stream", "permuted_stream", "split_stream", "synthetic_stream",
    # metrics
    "AccuracyMatrix", "average_accuracy", "backward_transfer", "forgetting",
    # reference models
    "MLP", "MultiHeadMLP", "SmallCNN", "ClassifierModule",
]
