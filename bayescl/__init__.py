"""bayescl: Bayesian continual learning for PyTorch Lightning.

The package is laid out by layer, arrows pointing down only (``docs/design.md``)::

    harness     bayescl.harness      benchmark runner, report, CLI, recipes, data, reference models and module
    adapters    bayescl.lightning    callbacks and the posterior-server Strategy;  bayescl.avalanche: plugins
    methods     bayescl.methods      variational layers, coresets, predictive, marglik, uncertainty
    core        bayescl.gaussian     Gaussians, the posterior server, the prior gradient
                bayescl.curvature    diagonal Fisher, KFAC, Laplace sites

Every public name is imported on first use, so ``import bayescl`` (and ``bayescl --help``) stays fast and an
optional extra (Avalanche, curvlinops) is needed only by what uses it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_NAMES: dict[str, str] = {
    # callbacks
    "LaplaceCallback": "bayescl.lightning.laplace", "Structure": "bayescl.lightning.laplace",
    "VCLCallback": "bayescl.lightning.vcl", "split_coreset": "bayescl.methods.coresets",
    "FunctionalPriorCallback": "bayescl.lightning.functional",  # a prior on functions (FROMP)
    "ReplayCallback": "bayescl.lightning.replay",  # experience replay, the baseline at equal memory
    # distributed training (a Lightning Strategy)
    "PosteriorServerStrategy": "bayescl.lightning.strategy",
    # resuming a stream
    "ResumableDataLoader": "bayescl.lightning.resumable", "resume_point": "bayescl.lightning.resume",
    # posterior core
    "DiagGaussian": "bayescl.gaussian.diag", "KronGaussian": "bayescl.gaussian.kron",
    "PosteriorServer": "bayescl.gaussian.server",
    # data
    **dict.fromkeys(["Scenario", "Task", "TaskStream", "make_stream", "permuted_stream", "split_stream",
                     "synthetic_stream"], "bayescl.harness.data"),
    # metrics
    **dict.fromkeys(["AccuracyMatrix", "average_accuracy", "backward_transfer", "forgetting"],
                    "bayescl.harness.metrics"),
    # reference models
    "MLP": "bayescl.harness.models", "MultiHeadMLP": "bayescl.harness.models", "SmallCNN": "bayescl.harness.models",
    "ClassifierModule": "bayescl.harness.module",
}
#: submodules users are told to call as ``bayescl.<name>``
_MODULES: dict[str, str] = {
    "avalanche": "bayescl.avalanche",  # needs the [avalanche] extra
    "predictive": "bayescl.methods.predictive",
    "uncertainty": "bayescl.methods.uncertainty",
    "marglik": "bayescl.methods.marglik",
    "variational": "bayescl.methods.variational",
    "coresets": "bayescl.methods.coresets",
    "curvature": "bayescl.curvature",
    "gaussian": "bayescl.gaussian",
    "lightning": "bayescl.lightning",
    "methods": "bayescl.methods",
    "harness": "bayescl.harness",
}

__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'bayescl' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES) | set(_MODULES))


if TYPE_CHECKING:  # the static view of the lazy names above
    from bayescl import avalanche, curvature, gaussian, harness, lightning, methods
    from bayescl.gaussian.diag import DiagGaussian
    from bayescl.gaussian.kron import KronGaussian
    from bayescl.gaussian.server import PosteriorServer
    from bayescl.harness.data import (
        Scenario,
        Task,
        TaskStream,
        make_stream,
        permuted_stream,
        split_stream,
        synthetic_stream,
    )
    from bayescl.harness.metrics import AccuracyMatrix, average_accuracy, backward_transfer, forgetting
    from bayescl.harness.models import MLP, MultiHeadMLP, SmallCNN
    from bayescl.harness.module import ClassifierModule
    from bayescl.lightning.functional import FunctionalPriorCallback
    from bayescl.lightning.laplace import LaplaceCallback, Structure
    from bayescl.lightning.replay import ReplayCallback
    from bayescl.lightning.resumable import ResumableDataLoader
    from bayescl.lightning.resume import resume_point
    from bayescl.lightning.strategy import PosteriorServerStrategy
    from bayescl.lightning.vcl import VCLCallback
    from bayescl.methods import coresets, marglik, predictive, uncertainty, variational
    from bayescl.methods.coresets import split_coreset
