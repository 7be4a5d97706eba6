"""Non-finite data and model outputs are refused by the curvature pass with the batch index, before any label is
sampled (``torch.multinomial`` would otherwise fail deep inside the pass), and the progress bar of the pass."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescl.curvature import diag_fisher, kfac

DT = torch.float64


def _passes():
    return {"diag": diag_fisher, "kron": kfac}


def _loader(n=12, bs=4, nan_at=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g, dtype=DT).abs() + 1.0
    y = torch.randint(0, 3, (n,), generator=g)
    if nan_at is not None:
        x[nan_at, 2] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)).to(DT)


@pytest.mark.parametrize("structure", ["diag", "kron"])
@pytest.mark.parametrize("fisher", ["mc", "exact", "empirical"])
def test_nan_inputs_are_refused_with_the_batch_index(structure, fisher):
    with pytest.raises(ValueError, match=r"batch 2 .*non-finite \(NaN/inf\) input"):
        _passes()[structure](_model(), _loader(nan_at=9), fisher=fisher)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_nan_float_targets_are_refused(structure):
    x = torch.randn(8, 5, dtype=DT)
    y = torch.randn(8, 3, dtype=DT)
    y[5, 0] = float("inf")
    with pytest.raises(ValueError, match="batch 1 .*target"):
        _passes()[structure](_model(), DataLoader(TensorDataset(x, y), batch_size=4), fisher="empirical", loss="mse")


@pytest.mark.parametrize("structure", ["diag", "kron"])
@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_weights_that_overflow_the_logits_are_refused_before_sampling(structure, fisher):
    """Finite weights of 1e200 overflow float64 after two layers: the outputs are inf at the current weights."""
    model = _model()
    with torch.no_grad():
        model[0].weight.fill_(1e200)
        model[1].weight.fill_(1e200)
    with pytest.raises(ValueError, match=r"model's outputs on batch 0 .*not finite .*current weights"):
        _passes()[structure](model, _loader(), fisher=fisher)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_progress_writes_a_tqdm_bar(structure, capsys):
    _passes()[structure](_model(), _loader(), progress=True)
    err = capsys.readouterr().err
    label = "diag Fisher (mc)" if structure == "diag" else "KFAC"
    assert f"{label}: 100%" in err and "3/3" in err, err
    _passes()[structure](_model(), _loader())
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_nan_curvature_data_in_a_fit_keeps_the_posterior_bit_for_bit(assert_bitwise_equal, make_trainer, small_model, structure):
    """Task 1's curvature data holds a NaN: the fit's automatic end_task raises before sampling (default MC
    Fisher), naming the batch, and the posterior of task 0 is left exactly as it was."""
    from bayescl import ClassifierModule, synthetic_stream
    from bayescl.lightning.laplace import LaplaceCallback

    stream = synthetic_stream(num_tasks=2, n_train=64, n_test=16)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback(structure=structure)
    make_trainer(cb).fit(module, DataLoader(stream[0].train, batch_size=16))
    before = copy.deepcopy(cb.server.state_dict())
    q_before = copy.deepcopy(cb.posterior().state_dict())
    x, y, t = (torch.stack(v) for v in zip(*(stream[1].train[i] for i in range(len(stream[1].train)))))
    x[40].view(-1)[0] = float("nan")
    cb.dataloader = DataLoader(TensorDataset(x, y, t), batch_size=16)
    with pytest.raises(ValueError, match="batch 2 .*non-finite"):
        make_trainer(cb).fit(module, DataLoader(stream[1].train, batch_size=16))
    assert_bitwise_equal(cb.server.state_dict(), before)
    assert_bitwise_equal(cb.posterior().state_dict(), q_before)
    assert cb.tasks_seen == 1


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_nan_weights_name_the_parameter(structure):
    model = _model()
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    with pytest.raises(ValueError, match="parameter '1.bias' is not finite"):
        _passes()[structure](model, _loader())


def test_evidence_fit_progress_bar_and_same_result(capsys):
    """The prior-precision fit that follows a Laplace pass (about 1-2 s for a 2x256 MLP) can show a bar too:
    9 grid chunks of 16 points and 40 refinement steps."""
    from bayescl.lightning.laplace import LaplaceCallback
    from bayescl.methods.marglik import fit_prior_precision

    q = LaplaceCallback(structure="diag", fisher="exact", prior_precision=1e-4).end_task(None, _model(), _loader())
    plain = fit_prior_precision(q, 1e-4)
    assert capsys.readouterr().err == ""
    assert fit_prior_precision(q, 1e-4, progress=True) == plain
    err = capsys.readouterr().err
    assert "Laplace evidence (prior precision): 100%" in err and "49/49" in err, err


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_fit_with_a_progress_bar_shows_the_end_of_task_pass(small_model, structure, capsys):
    """A Trainer that shows a progress bar gets one for the curvature pass too (KFAC: over ``_Data``)."""
    import pytorch_lightning as pl

    from bayescl import ClassifierModule, synthetic_stream
    from bayescl.lightning.laplace import LaplaceCallback

    stream = synthetic_stream(num_tasks=1, n_train=48, n_test=16)
    cb = LaplaceCallback(structure=structure)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(small_model(), num_tasks=3), DataLoader(stream[0].train, batch_size=16))
    err = capsys.readouterr().err
    assert ("diag Fisher (mc): 100%" if structure == "diag" else "KFAC: 100%") in err and "3/3" in err, err
