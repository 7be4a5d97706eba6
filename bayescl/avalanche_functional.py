r"""The function-space prior (FROMP) as an Avalanche plugin (``pip install "bayescl[avalanche]"``, Avalanche 0.6).

:class:`FunctionalPriorPlugin` drives a :class:`~bayescl.lightning.functional.FunctionalPriorCallback` from Avalanche's
hooks exactly as :class:`~bayescl.avalanche.LaplacePlugin` drives a ``LaplaceCallback`` (it is one, with another
callback); the maths is the callback's::

    from avalanche.training import Naive
    strategy = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=64,
                     plugins=[FunctionalPriorPlugin(memory_size=200, tau=1.0)], evaluator=evaluator)

* ``before_training_exp``: parameters not seen so far get the base prior; :math:`N_t` is the size of the data the
  strategy trains on.
* ``before_update`` (after ``backward``, before the optimizer step): the gradient of
  :math:`\frac{\tau}{N_t}R(\theta)`, the past experiences' Gaussian processes at their memorable points, is added
  to ``.grad`` (``callback.add_prior_grad``), once per optimizer step.
* ``after_training_exp``: ``callback.end_task(None, model, batches)`` with the experience's dataset (eval
  transforms) in bayescl's batch convention (``(x, y, t)`` for an Avalanche ``MultiTaskModule``, ``(x, y)``
  otherwise): the Laplace site, then the memorable points chosen from those batches and their kernel.

``forget`` / ``reset`` / ``server`` / ``posterior`` pass through to the callback; ``callback.sites`` holds the
function sites. This module imports Avalanche at import time (through :mod:`bayescl.avalanche`).
"""

from __future__ import annotations

from typing import Any

from bayescl.avalanche import LaplacePlugin
from bayescl.lightning.functional import FunctionalPriorCallback

__all__ = ["FunctionalPriorPlugin"]


class FunctionalPriorPlugin(LaplacePlugin):
    """FROMP for Avalanche: a Gaussian-process prior on the outputs at each past experience's memorable points.

    Args:
        callback: an existing ``FunctionalPriorCallback`` to drive instead of building one (then give no other
            callback argument).
        curvature_batch_size: batch size of the end-of-experience passes (default: the strategy's
            ``train_mb_size``).
        **kwargs: the other ``FunctionalPriorCallback`` arguments (``memory_size``, ``selection``, ``tau``,
            ``output``, ``points_per_step``, ``structure``, ``fisher``, ``prior_precision``, ...); parameter names are
            the model's.

    Raises:
        ValueError: Lightning-only arguments, or both ``callback`` and callback arguments.
        TypeError: ``callback`` is not a ``FunctionalPriorCallback``.
    """

    callback_class = FunctionalPriorCallback

    @property
    def sites(self) -> dict[str, Any]:
        """The callback's function sites, by name."""
        return self.callback.sites
