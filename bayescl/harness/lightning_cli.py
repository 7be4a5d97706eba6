"""LightningCLI over :class:`~bayescl.harness.module.ClassifierModule` and
:class:`~bayescl.harness.datamodule.TaskDataModule`: ``python -m bayescl.harness.lightning_cli fit --config ...``
(needs ``jsonargparse[signatures]``, Lightning's CLI extra). A recipe's ``callbacks`` go under ``trainer.callbacks``.
"""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI

from bayescl.harness.datamodule import TaskDataModule
from bayescl.harness.module import ClassifierModule


def main() -> None:
    LightningCLI(ClassifierModule, TaskDataModule, save_config_callback=None)


if __name__ == "__main__":
    main()
