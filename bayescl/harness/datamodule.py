"""One task of a stream as a LightningDataModule: the one-task-per-run workflow (LightningCLI, or a scheduler that
starts a process per task) fits ``--data.task t`` with ``--ckpt_path`` the previous run's last checkpoint, and the
callback carries the posterior from run to run (``docs/trainer-configurations.md``).

Example (a recipe's callbacks in a LightningCLI config)::

    python -m bayescl.harness.lightning_cli fit --config run.yaml --data.task 1 --ckpt_path ckpts/last.ckpt
"""

from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from bayescl._checks import check_positive_int
from bayescl.harness.data import TaskStream, make_stream

__all__ = ["TaskDataModule"]


class TaskDataModule(pl.LightningDataModule):
    """Task ``task`` of ``make_stream(scenario, seed=stream_seed)``.

    Args:
        scenario: a scenario name (``bayescl bench --help`` lists them), e.g. ``"split-mnist-task"``.
        task: the task index (0-based).
        batch_size: training batch size.
        stream_seed: seeds the stream (the split or the permutations).
        root: the data folder (default: ``$BAYESCL_DATA``, else ``./data``).
    """

    def __init__(self, scenario: str = "synthetic", task: int = 0, batch_size: int = 64, stream_seed: int = 0,
                 root: str | None = None) -> None:
        super().__init__()
        self.scenario, self.root = scenario, root
        self.task = check_positive_int(task, "task", allow_zero=True)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.stream_seed = int(stream_seed)
        self._stream: TaskStream | None = None

    @property
    def stream(self) -> TaskStream:
        if self._stream is None:
            kwargs = {"seed": self.stream_seed}
            if self.root is not None:
                kwargs["root"] = self.root
            self._stream = make_stream(self.scenario, **kwargs)
            if self.task >= len(self._stream):
                raise ValueError(f"task={self.task} is out of range: {self.scenario!r} has {len(self._stream)} tasks.")
        return self._stream

    def train_dataloader(self) -> DataLoader:
        return self.stream[self.task].train_dataloader(batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.stream[self.task].test_dataloader()
