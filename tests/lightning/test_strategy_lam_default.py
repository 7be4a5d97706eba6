"""PosteriorServerStrategy's defaults, ``normalize=True`` and ``lam`` (chosen on validation data:
benchmarks/results/distributed/lam-normalized.md), and that they reach the strategy's curvature path."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.data import DataLoader

from bayescl import ClassifierModule, MultiHeadMLP, synthetic_stream
from bayescl.lightning.strategy import PosteriorServerStrategy
from bayescl.lightning.strategy_sites import shard_curvature

DEFAULT_LAM = 0.3  # benchmarks/results/distributed/lam-normalized.md: best validation score of 0.001 ... 3
SHARD = 64


def _setup():
    torch.manual_seed(0)
    module = ClassifierModule(MultiHeadMLP(hidden=(16,), num_tasks=2), num_tasks=2, lr=1e-2)
    batches = list(DataLoader(synthetic_stream(num_tasks=2, n_train=64, n_test=16, seed=0)[0].train,
                              batch_size=16))[:2]
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    return module, batches, names


def test_defaults_are_the_validated_values():
    params = inspect.signature(PosteriorServerStrategy).parameters
    assert params["lam"].default == DEFAULT_LAM and params["normalize"].default is True
    s = PosteriorServerStrategy()
    assert s.lam == DEFAULT_LAM and s.normalize is True


def test_normalize_must_be_a_bool():
    with pytest.raises(TypeError, match="normalize"):
        PosteriorServerStrategy(normalize=1)


def test_default_local_curvature_is_the_normalised_fisher():
    """With no argument, a sync's local curvature is the shard's Fisher estimate rescaled so that its mean over the
    weights it touches is ``lam N_k`` (as LaplaceCallback's normalised site), proportional to the raw estimate."""
    module, batches, names = _setup()
    raw = shard_curvature(module, batches, names, "exact", 1, seed=0, shard=SHARD, lam=1.0)
    strategy = PosteriorServerStrategy(fisher="exact")  # lam and normalize left at their defaults
    strategy._buffer.extend(batches)
    strategy._shard_size = SHARD
    local = strategy.local_curvature(module)
    assert set(local) == set(names)
    touched = torch.cat([local[n][raw[n] > 0] for n in names]).double()
    assert touched.numel() > 0
    torch.testing.assert_close(touched.mean().item(), DEFAULT_LAM * SHARD, rtol=1e-6, atol=0)
    # one factor for every weight: the normalised site is the raw one times a constant
    ratio = DEFAULT_LAM * SHARD / torch.cat([raw[n][raw[n] > 0] for n in names]).double().mean()
    for n in names:
        torch.testing.assert_close(local[n], (raw[n].double() * ratio).to(raw[n].dtype))
    raw_local = PosteriorServerStrategy(fisher="exact", normalize=False, lam=DEFAULT_LAM)
    raw_local._buffer.extend(batches)
    raw_local._shard_size = SHARD
    assert not all(torch.allclose(a, b) for a, b in zip(raw_local.local_curvature(module).values(), local.values()))
