"""PosteriorServerStrategy's default ``lam`` (chosen on validation data: benchmarks/results/distributed/lam.md) and
that it reaches the strategy's curvature path."""

from __future__ import annotations

import inspect

import torch
from torch.utils.data import DataLoader

from bayescl import ClassifierModule, MultiHeadMLP, synthetic_stream
from bayescl.lightning.strategy import PosteriorServerStrategy
from bayescl.lightning.strategy_sites import shard_curvature

DEFAULT_LAM = 1000.0  # benchmarks/results/distributed/lam.md: best validation score of 1 ... 10000


def test_default_lam_is_the_validated_value():
    assert inspect.signature(PosteriorServerStrategy).parameters["lam"].default == DEFAULT_LAM
    assert PosteriorServerStrategy().lam == DEFAULT_LAM


def test_default_lam_scales_the_local_curvature():
    """With no ``lam`` argument, a sync's local curvature is DEFAULT_LAM × that of ``lam=1`` (N_k / n_b × the
    summed diagonal Fisher of the buffered batches)."""
    torch.manual_seed(0)
    module = ClassifierModule(MultiHeadMLP(hidden=(16,), num_tasks=2), num_tasks=2, lr=1e-2)
    batches = list(DataLoader(synthetic_stream(num_tasks=2, n_train=64, n_test=16, seed=0)[0].train,
                              batch_size=16))[:2]
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    unit = shard_curvature(module, batches, names, "exact", 1, seed=0, shard=64, lam=1.0)
    strategy = PosteriorServerStrategy(fisher="exact")  # lam left at its default
    strategy._buffer.extend(batches)
    strategy._shard_size = 64
    local = strategy.local_curvature(module)
    assert set(local) == set(names)
    for n in names:
        torch.testing.assert_close(local[n], DEFAULT_LAM * unit[n])
    assert any(float(unit[n].abs().max()) > 0 for n in names)  # not a vacuous 0 == 1000 × 0
