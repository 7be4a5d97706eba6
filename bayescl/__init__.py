"""bayescl: Bayesian continual learning for PyTorch Lightning."""

from .data import Scenario, Task, TaskStream, make_stream, permuted_stream, split_stream, synthetic_stream
from .metrics import AccuracyMatrix, average_accuracy, backward_transfer, forgetting
from .models import MLP, MultiHeadMLP, SmallCNN
from .module import ClassifierModule

__all__ = [
    # data
    "Scenario", "Task", "TaskStream", "make_stream", "permuted_stream", "split_stream", "synthetic_stream",
    # metrics
    "AccuracyMatrix", "average_accuracy", "backward_transfer", "forgetting",
    # reference models
    "MLP", "MultiHeadMLP", "SmallCNN", "ClassifierModule",
]
