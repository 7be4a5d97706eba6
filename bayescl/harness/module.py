"""A plain classification LightningModule: what a user already has before adding a bayescl callback.

The benchmark harness wraps its reference networks in it; nothing Bayesian happens here. It follows the batch
convention of :mod:`bayescl._batches` and fills an :class:`~bayescl.harness.metrics.AccuracyMatrix` at test time, with
one test dataloader per task (``dataloader_idx`` is the task index) and :attr:`stage` set to the index of the
last task trained on.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayescl._batches import split_batch
from bayescl._checks import check_positive_int, check_real
from bayescl.harness.metrics import AccuracyMatrix

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")


class ClassifierModule(pl.LightningModule):
    r"""Cross-entropy training of ``model`` with Adam (or SGD); per-task test accuracy.

    A new optimizer is built at every ``fit`` (Lightning calls ``configure_optimizers`` each time), so Adam's
    moment estimates do not carry over from one task to the next.

    Args:
        model: called as ``model(x)`` or ``model(x, task_id)``.
        num_tasks: tasks in the stream (size of the accuracy matrix).
        lr: the optimizer's learning rate.
        optimizer: ``"adam"`` (the protocol's) or ``"sgd"`` (with ``momentum``); a recipe sets it under
            ``module:``.
        momentum: SGD's momentum (unused by Adam).
        lr_schedule: ``"constant"`` (the protocol's) or ``"cosine"``: within every ``fit`` (every task) the learning
            rate falls from ``lr`` to 0 along a half cosine over the fit's optimizer steps,
            :math:`\eta_k = \frac{\eta}{2}(1 + \cos(\pi k / K))` (``CosineAnnealingLR``, stepped every step).
    """

    def __init__(self, model: nn.Module, num_tasks: int, lr: float = 1e-3, optimizer: str = "adam",
                 momentum: float = 0.9, lr_schedule: str = "constant") -> None:
        super().__init__()
        self.model = model
        self.lr = check_real(lr, "lr", low=0.0, low_open=True)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not valid; allowed: {', '.join(OPTIMIZERS)}.")
        self.optimizer = optimizer
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r} is not valid; allowed: {', '.join(LR_SCHEDULES)}.")
        self.lr_schedule = lr_schedule
        self.num_tasks = check_positive_int(num_tasks, "num_tasks")
        self.stage = 0
        self.acc_matrix = AccuracyMatrix(num_tasks)

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model(*inputs)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        inputs, y = split_batch(batch)
        loss = F.cross_entropy(self(*inputs), y)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        inputs, y = split_batch(batch)
        logits = self(*inputs)
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=len(y), add_dataloader_idx=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, batch_size=len(y))

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        inputs, y = split_batch(batch)
        logits = self(*inputs)
        self.acc_matrix.update(logits, y, stage=self.stage, task=dataloader_idx)
        self.log("test/acc", (logits.argmax(-1) == y).float().mean(), batch_size=len(y))

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        inputs, _ = split_batch(batch)
        return torch.softmax(self(*inputs), dim=-1)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        else:
            opt = torch.optim.Adam(params, lr=self.lr)
        if self.lr_schedule == "constant":
            return opt
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}
