"""The scenario names the harness knows, without importing torch (``bayescl --help`` lists them).

:func:`bayescl.harness.data.make_stream` builds each one; see :mod:`bayescl.harness.data` for what they are.
"""

from __future__ import annotations

import enum

SPLIT_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


class Scenario(str, enum.Enum):
    """The named scenarios that :func:`bayescl.harness.data.make_stream` builds."""

    SPLIT_MNIST_TASK = "split-mnist-task"
    SPLIT_MNIST_DOMAIN = "split-mnist-domain"
    SPLIT_MNIST_CLASS = "split-mnist-class"
    SPLIT_FASHION_TASK = "split-fashion-task"
    SPLIT_FASHION_DOMAIN = "split-fashion-domain"
    SPLIT_FASHION_CLASS = "split-fashion-class"
    PERMUTED_MNIST = "permuted-mnist"
    SYNTHETIC = "synthetic"

    @property
    def needs_files(self) -> bool:
        return self is not Scenario.SYNTHETIC

    @property
    def dataset(self) -> str:
        return "FashionMNIST" if "fashion" in self.value else "MNIST"

    @property
    def setting(self) -> str:
        """``task``, ``domain`` or ``class`` incremental."""
        if self is Scenario.SYNTHETIC:
            return "task"
        return "domain" if self is Scenario.PERMUTED_MNIST else self.value.rsplit("-", 1)[1]


def default_num_tasks(scenario: Scenario) -> int:
    """Tasks in a scenario's stream when ``num_tasks`` is not given (split: 5 class pairs, permuted MNIST: 10,
    synthetic: 3)."""
    if scenario is Scenario.PERMUTED_MNIST:
        return 10
    if scenario is Scenario.SYNTHETIC:
        return 3
    return len(SPLIT_PAIRS)
