import math

import pytest
import torch

from bayescl.harness.metrics import AccuracyMatrix, average_accuracy, backward_transfer, forgetting, summarize

R = torch.tensor([
    [0.9, 0.1, 0.2],
    [0.7, 0.8, 0.3],
    [0.6, 0.5, 0.95],
], dtype=torch.float64)


def test_hand_computed_scalars():
    # ACC = (0.6 + 0.5 + 0.95) / 3; BWT = ((0.6-0.9) + (0.5-0.8)) / 2; F = ((0.9-0.6) + (0.8-0.5)) / 2
    assert math.isclose(float(average_accuracy(R)), 2.05 / 3)
    assert math.isclose(float(backward_transfer(R)), -0.3)
    assert math.isclose(float(forgetting(R)), 0.3)
    assert math.isclose(float(average_accuracy(R, stage=1)), 0.75)


def test_forgetting_uses_best_earlier_accuracy():
    R2 = torch.tensor([[0.5, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.8, 0.7]], dtype=torch.float64)
    # task 0: best before the end 0.9 -> 0.6 (0.3); task 1: 0.8 -> 0.8 (0); BWT uses the diagonal: 0.1 and 0
    assert math.isclose(float(forgetting(R2)), 0.15)
    assert math.isclose(float(backward_transfer(R2)), 0.05)


def test_partial_matrix_uses_last_evaluated_stage():
    P = torch.full((3, 3), float("nan"), dtype=torch.float64)
    P[0] = torch.tensor([0.9, 0.1, 0.2], dtype=torch.float64)
    P[1] = torch.tensor([0.7, 0.8, 0.3], dtype=torch.float64)
    assert math.isclose(float(average_accuracy(P)), 0.75)
    assert math.isclose(float(backward_transfer(P)), -0.2)
    assert math.isnan(summarize(P[:1, :1])["bwt"])


def test_accuracy_matrix_metric_counts():
    m = AccuracyMatrix(num_tasks=2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
    m.update(logits, torch.tensor([0, 1, 1, 1]), stage=0, task=0)  # 3/4
    m.update(torch.tensor([1, 1]), torch.tensor([1, 0]), stage=0, task=1)  # labels: 1/2
    m.update(torch.tensor([1]), torch.tensor([1]), stage=1, task=1)
    out = m.compute()
    assert out[0, 0] == 0.75 and out[0, 1] == 0.5 and out[1, 1] == 1.0 and torch.isnan(out[1, 0])


def test_accuracy_matrix_bad_input():
    m = AccuracyMatrix(num_tasks=2)
    with pytest.raises(ValueError, match="stage=2"):
        m.update(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), stage=2, task=0)
    with pytest.raises(ValueError, match="num_tasks=0"):
        AccuracyMatrix(num_tasks=0)
    with pytest.raises(ValueError, match="square"):
        average_accuracy(torch.zeros(2, 3))
