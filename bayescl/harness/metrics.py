r"""Continual-learning metrics on torchmetrics.

The accuracy matrix :math:`R \in [0,1]^{T\times T}` holds :math:`R_{ij}`, the accuracy on task :math:`j` after
training on task :math:`i` (rows: training stage, columns: evaluated task; 0-based). From it
(Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018):

.. math::

    \mathrm{ACC} = \frac1T \sum_{j} R_{T-1,j}, \qquad
    \mathrm{BWT} = \frac1{T-1} \sum_{j<T-1} (R_{T-1,j} - R_{jj}), \qquad
    \mathrm{F} = \frac1{T-1} \sum_{j<T-1} \max_{i<T-1} R_{ij} - R_{T-1,j}.

Entries never evaluated are NaN. ``T`` is the last stage with an evaluation, so the functions also work on a
partially filled matrix (a stream stopped early).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from bayescl._checks import check_positive_int


def _last_stage(R: Tensor) -> int:
    if R.dim() != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"accuracy matrix must be square (T, T); got shape {tuple(R.shape)}.")
    rows = (~torch.isnan(R)).any(dim=1).nonzero()
    if rows.numel() == 0:
        raise ValueError("accuracy matrix has no evaluated entry.")
    return int(rows.max())


def average_accuracy(R: Tensor, stage: int | None = None) -> Tensor:
    """Mean accuracy over tasks ``0..stage`` after training task ``stage`` (default: the last stage)."""
    R = torch.as_tensor(R, dtype=torch.float64)
    s = _last_stage(R) if stage is None else stage
    return R[s, : s + 1].mean()


def backward_transfer(R: Tensor) -> Tensor:
    """BWT: mean change of accuracy on earlier tasks between learning them and the end (negative = forgetting)."""
    R = torch.as_tensor(R, dtype=torch.float64)
    s = _last_stage(R)
    if s == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    j = torch.arange(s)
    return (R[s, j] - R[j, j]).mean()


def forgetting(R: Tensor) -> Tensor:
    """Average forgetting: best earlier accuracy on a task minus its final accuracy, over tasks ``0..T-2``."""
    R = torch.as_tensor(R, dtype=torch.float64)
    s = _last_stage(R)
    if s == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    best = torch.stack([R[j:s, j].max() for j in range(s)])
    return (best - R[s, :s]).mean()


def summarize(R: Tensor) -> dict[str, float]:
    """``{"avg_accuracy", "bwt", "forgetting"}`` of one accuracy matrix, as floats."""
    return {
        "avg_accuracy": float(average_accuracy(R)),
        "bwt": float(backward_transfer(R)),
        "forgetting": float(forgetting(R)),
    }


class AccuracyMatrix(Metric):
    """Accumulates correct / total counts per (training stage, evaluated task) and computes ``R``.

    Use it from a LightningModule's ``test_step`` (one dataloader per task) or from a plain loop::

        metric = AccuracyMatrix(num_tasks=5)
        metric.update(logits, y, stage=i, task=j)   # after training task i, on task j's test data
        R = metric.compute()                        # (5, 5), NaN where never evaluated

    Args:
        num_tasks: number of tasks ``T`` in the stream.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_tasks = check_positive_int(num_tasks, "num_tasks")
        self.add_state("correct", torch.zeros(num_tasks, num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_tasks, num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, stage: int, task: int) -> None:  # type: ignore[override]
        """Count predictions on task ``task`` after training stage ``stage``.

        Args:
            preds: logits / probabilities ``(B, C)`` or predicted labels ``(B,)``.
            target: labels ``(B,)``.
            stage: index of the last task trained on.
            task: index of the task evaluated.
        """
        for name, v in (("stage", stage), ("task", task)):
            if not 0 <= int(v) < self.num_tasks:
                raise ValueError(f"{name}={v} is out of range; allowed: 0..{self.num_tasks - 1}.")
        labels = preds.argmax(dim=-1) if preds.dim() == target.dim() + 1 else preds
        if labels.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} do not match.")
        self.correct[stage, task] += (labels == target).sum()
        self.total[stage, task] += target.numel()

    def compute(self) -> Tensor:
        R = self.correct.double() / self.total.double()
        return torch.where(self.total > 0, R, torch.full_like(R, float("nan")))


def mean_std(values: list[float]) -> dict[str, float]:
    """``{"mean", "std"}`` of per-seed numbers (sample standard deviation; 0 for a single value), as results report
    them."""
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}
