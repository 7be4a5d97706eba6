import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from bayescl.methods.coresets import (
    kcenter_coreset,
    random_coreset,
    select_coreset,
    split_coreset,
    stack_dataset,
)


def _brute_kcenter(x, size, first=0):
    flat = x.reshape(len(x), -1).double()
    chosen = [first]
    while len(chosen) < size:
        d = torch.cdist(flat, flat[chosen]).min(1).values
        chosen.append(int(d.argmax()))
    return chosen


def test_kcenter_picks_far_points():
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(50, 1, 4, 4, generator=g)
    outliers = [7, 23, 41]
    for k, i in enumerate(outliers):
        x[i] += 10.0 * (k + 1) * torch.ones(1, 4, 4) * (-1) ** k
    idx = kcenter_coreset(x, 4)
    assert idx[0] == 0
    assert set(outliers) <= set(idx.tolist())
    y = torch.randn(30, 5, generator=g)
    assert kcenter_coreset(y, 8, first=3).tolist() == _brute_kcenter(y, 8, first=3)


def test_random_coreset_size_and_seed():
    idx = random_coreset(100, 10, torch.Generator().manual_seed(0))
    assert len(idx) == 10 and len(set(idx.tolist())) == 10 and 0 <= int(idx.min()) and int(idx.max()) < 100
    assert torch.equal(idx, random_coreset(100, 10, torch.Generator().manual_seed(0)))


def test_coreset_too_large():
    ds = TensorDataset(torch.randn(5, 2), torch.zeros(5, dtype=torch.long))
    for method in ("random", "kcenter"):
        with pytest.raises(ValueError, match="coreset_size=5"):
            select_coreset(ds, 5, method)
        with pytest.raises(ValueError, match="coreset_size=9"):
            split_coreset(ds, 9, method)
    with pytest.raises(ValueError, match="coreset_size"):
        select_coreset(ds, 0)
    with pytest.raises(ValueError, match="coreset_method"):
        select_coreset(ds, 2, "greedy")


class _ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("method", ["random", "kcenter"])
def test_split_partitions_the_task(method):
    x = torch.randn(40, 1, 3, 3)
    y = torch.arange(40) % 2
    ds = Subset(TensorDataset(x, y, torch.full((40,), 2)), list(range(5, 35)))
    train, core = split_coreset(ds, 6, method, torch.Generator().manual_seed(1))
    assert len(train) == 24 and len(core) == 6
    assert set(train.indices).isdisjoint(core.indices) and set(train.indices) | set(core.indices) == set(range(30))
    cx, _, ct = stack_dataset(core)
    assert torch.equal(cx, x[[5 + i for i in core.indices]]) and bool((ct == 2).all())
    generic = _ListDataset([(x[i], y[i]) for i in range(40)])
    gx, gy = stack_dataset(generic, [3, 1])
    assert torch.equal(gx, x[[3, 1]]) and torch.equal(gy, y[[3, 1]])
