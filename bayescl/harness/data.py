"""Continual-learning task streams that a Lightning user hands to ``trainer.fit`` one task at a time.

Scenarios (van de Ven & Tolias 2019; Hsu et al. 2018):

* ``split-mnist-task`` / ``split-fashion-task`` – task-incremental: 5 tasks of two classes (0/1 … 8/9); a batch is
  ``(x, y, task_id)`` with ``y`` local to the task (0 or 1), for a multi-head network.
* ``split-mnist-domain`` / ``split-fashion-domain`` – domain-incremental: the same tasks, batches ``(x, y)`` with
  ``y`` in {0, 1} on one shared 2-way head.
* ``split-mnist-class`` / ``split-fashion-class`` – class-incremental: batches ``(x, y)`` with global labels 0–9.
* ``permuted-mnist`` – ``num_tasks`` seeded pixel permutations of MNIST (first one optionally the identity),
  batches ``(x, y)`` with labels 0–9 on one head.

Pixels are in [0, 1] by default (the VCL protocol); ``normalize=True`` standardises with the dataset's mean/std.
The data root is the ``root`` argument, else ``$BAYESCL_DATA``, else ``./data``; files follow torchvision's
layout ``<root>/MNIST/raw/train-images-idx3-ubyte`` etc. Missing files are fetched (see :mod:`bayescl.harness.fetch`).
Every builder takes ``val_fraction``: that seeded fraction of each task's training data becomes ``Task.val`` (the
data that may choose hyperparameters; the test data never does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from bayescl._checks import as_enum, check_positive_int, check_real
from bayescl.harness.scenarios import SPLIT_PAIRS, Scenario

DATASET_STATS = {"MNIST": (0.1307, 0.3081), "FashionMNIST": (0.2860, 0.3530)}
#: labels of a dataset lie in ``0 .. NUM_CLASSES[dataset] - 1``
NUM_CLASSES = {"MNIST": 10, "FashionMNIST": 10}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``root`` if given, else ``$BAYESCL_DATA``, else ``./data``."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("BAYESCL_DATA", "data"))


# --------------------------------------------------------------------------------------------------- IDX files
def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an uncompressed IDX file (``ubyte`` data only), checking its magic number and size.

    Raises:
        ValueError: the magic number is not that of a ubyte IDX file, or the file's size disagrees with its
            header (a truncated or corrupt download); the message names the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise ValueError(
            f"{path} is not a ubyte IDX file: magic number {raw[:4].hex() or '(empty)'}, expected 00000801 "
            "(labels) or 00000803 (images)."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"{path} has {len(raw)} bytes but its header {shape} says {expected}; the file is corrupt or truncated."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(dataset: str, split: str, root: str | os.PathLike[str] | None = None) -> tuple[Tensor, Tensor]:
    """Load ``(images uint8 (N, 28, 28), labels int64 (N,))`` of MNIST / FashionMNIST ``train`` or ``test``.

    Missing files are fetched through :func:`bayescl.harness.fetch.ensure_dataset` first; the pair is checked with
    :func:`check_idx_pair` (a label file with overwritten bytes would otherwise drop examples silently).

    Raises:
        ValueError: unknown ``dataset`` / ``split``, or files that fail :func:`read_idx` / :func:`check_idx_pair`.
    """
    from bayescl.harness.fetch import ensure_dataset

    if dataset not in DATASET_STATS:
        raise ValueError(f"dataset={dataset!r} is not known; allowed: {', '.join(DATASET_STATS)}.")
    if split not in IDX_FILES:
        raise ValueError(f"split={split!r} is not valid; allowed: 'train', 'test'.")
    raw = ensure_dataset(dataset, data_root(root))
    paths = tuple(raw / name for name in IDX_FILES[split])
    key = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    if key not in _CACHE:
        images, labels = (read_idx(p) for p in paths)
        check_idx_pair(images, labels, *paths, num_classes=NUM_CLASSES[dataset])
        _CACHE[key] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    return _CACHE[key]


def check_idx_pair(images: np.ndarray, labels: np.ndarray, images_path: str | os.PathLike[str],
                   labels_path: str | os.PathLike[str], num_classes: int = 10,
                   image_shape: tuple[int, int] = (28, 28)) -> None:
    """Check an image file and its label file as read by :func:`read_idx`.

    Args:
        images: Expected ``uint8`` of shape ``(N, *image_shape)``.
        labels: Expected ``uint8`` of shape ``(N,)`` with values in ``0 .. num_classes - 1``.
        images_path: The image file (named in errors).
        labels_path: The label file (named in errors).
        num_classes: Number of classes of the dataset (10 for MNIST and Fashion-MNIST).
        image_shape: Height and width of an image.

    Raises:
        ValueError: a wrong dtype or shape, counts that differ, or labels out of range; the message names the
            file and the bad values.
    """
    if images.dtype != np.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{images_path}: images must be uint8 of shape (N, {image_shape[0]}, {image_shape[1]}); "
                         f"got {images.dtype} of shape {tuple(images.shape)}.")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{labels_path}: labels must be uint8 of shape (N,); got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} "
                         "labels; the counts must match (a corrupt or mismatched file).")
    bad = labels >= num_classes
    if bool(bad.any()):
        values, counts = np.unique(labels[bad], return_counts=True)
        where = np.flatnonzero(bad)[:5].tolist()
        shown = ", ".join(f"{int(v)} ({int(c)}x)" for v, c in zip(values[:10], counts[:10]))
        raise ValueError(f"{labels_path}: {int(bad.sum())} of {labels.size} labels are outside 0..{num_classes - 1}: "
                         f"{shown}{', ...' if values.size > 10 else ''} (first at positions {where}); the file is "
                         "corrupt (re-fetch it; `bayescl data verify` checks the checksums).")


#: Decoded IDX files, keyed by both files' paths, modification times and sizes (a stream per seed reads the same
#: files; a rewritten label file is read again).
_CACHE: dict[tuple[tuple[str, int, int], ...], tuple[Tensor, Tensor]] = {}


# --------------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One task of a stream: train / validation / test datasets and their dataloaders.

    Attributes:
        task_id: position of the task in the stream (0-based).
        classes: the global labels the task contains.
        train, test: datasets whose items are ``(x, y)`` or ``(x, y, task_id)``.
        val: a held-out part of the training data (``None`` when ``val_fraction=0``).
    """

    task_id: int
    classes: tuple[int, ...]
    train: Dataset
    test: Dataset
    val: Dataset | None = None

    def train_dataloader(self, batch_size: int = 64, shuffle: bool = True, seed: int = 0, **kwargs) -> DataLoader:
        """The task's training loader: a :class:`~bayescl.lightning.ResumableDataLoader`.

        Each epoch's order depends on ``(seed, epoch)`` only, so a fit resumed from a checkpoint (mid-epoch
        included) trains on exactly the batches an uninterrupted fit would.

        Args:
            batch_size: examples per batch.
            shuffle: a new order every epoch (drawn from ``(seed, epoch)``); ``False``: dataset order.
            seed: the seed of the orders (different seeds, different orders).
            **kwargs: other :class:`~torch.utils.data.DataLoader` arguments (not ``sampler``, ``batch_sampler``
                or ``generator``: the loader draws its own order).
        """
        from bayescl.lightning.resumable import ResumableDataLoader

        return ResumableDataLoader(self.train, batch_size=check_positive_int(batch_size, "batch_size"),
                                   shuffle=shuffle, seed=seed, **kwargs)

    def val_dataloader(self, batch_size: int = 1000, **kwargs) -> DataLoader | None:
        if self.val is None:
            return None
        return DataLoader(self.val, batch_size=check_positive_int(batch_size, "batch_size"), **kwargs)

    def test_dataloader(self, batch_size: int = 1000, **kwargs) -> DataLoader:
        return DataLoader(self.test, batch_size=check_positive_int(batch_size, "batch_size"), **kwargs)


@dataclass
class TaskStream:
    """An ordered sequence of :class:`Task`; iterate over it and ``fit`` once per task.

    Attributes:
        name: the scenario's name.
        setting: ``task``, ``domain`` or ``class`` incremental.
        num_classes: outputs per head (2 for task/domain split, 10 otherwise).
        with_task_id: batches carry the task id (task-incremental).
    """

    name: str
    setting: str
    num_classes: int
    tasks: list[Task] = field(default_factory=list)

    @property
    def with_task_id(self) -> bool:
        return self.setting == "task"

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def cumulative_train(self, upto: int) -> Dataset:
        """Training data of tasks ``0..upto`` together (the joint / upper-bound baseline)."""
        return ConcatDataset([t.train for t in self.tasks[: upto + 1]])


def _to_float(images: Tensor, normalize: bool, dataset: str) -> Tensor:
    x = images.float().div_(255.0).unsqueeze(1)
    if normalize:
        mean, std = DATASET_STATS[dataset]
        x = (x - mean) / std
    return x


def _tensor_dataset(x: Tensor, y: Tensor, task_id: int | None) -> TensorDataset:
    if task_id is None:
        return TensorDataset(x, y)
    return TensorDataset(x, y, torch.full_like(y, task_id))


def split_validation(ds: Dataset, val_fraction: float,
                     generator: torch.Generator) -> tuple[Dataset, Dataset | None]:
    """``(train, val)``: a random ``round(val_fraction * n)`` examples of ``ds`` (at least one, drawn with
    ``generator``) held out as ``val``, the rest ``train``; ``(ds, None)`` when ``val_fraction`` is 0.

    Raises:
        ValueError: the split would leave no training example.
    """
    if val_fraction == 0:
        return ds, None
    n = len(ds)
    perm = torch.randperm(n, generator=generator)
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} holds out {n_val} of a task's {n} training examples and "
                         "leaves none to train on; use a smaller val_fraction (or a larger limit).")
    return Subset(ds, perm[n_val:].tolist()), Subset(ds, perm[:n_val].tolist())


def split_stream(
    dataset: str = "MNIST",
    setting: str = "task",
    *,
    root: str | os.PathLike[str] | None = None,
    normalize: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
    pairs: Sequence[tuple[int, ...]] = SPLIT_PAIRS,
    limit: int | None = None,
) -> TaskStream:
    """Split MNIST / Fashion-MNIST: one task per class group (default 0/1, 2/3, 4/5, 6/7, 8/9).

    Args:
        dataset: ``"MNIST"`` or ``"FashionMNIST"``.
        setting: ``"task"`` (local labels, batches carry the task id), ``"domain"`` (local labels, one head) or
            ``"class"`` (global labels).
        root: data root (see :func:`data_root`).
        normalize: standardise pixels instead of keeping them in [0, 1].
        val_fraction: fraction of each task's training data held out for validation (0 = none).
        seed: seeds the validation split.
        pairs: the class groups, one per task.
        limit: keep only the first ``limit`` training and test examples of each task (quick runs, tests).
    """
    if setting not in ("task", "domain", "class"):
        raise ValueError(f"setting={setting!r} is not valid; allowed: 'task', 'domain', 'class'.")
    check_real(val_fraction, "val_fraction", low=0.0, high=1.0, high_open=True)
    if limit is not None:
        check_positive_int(limit, "limit")
    g = torch.Generator().manual_seed(seed)
    splits = {s: load_split(dataset, s, root) for s in ("train", "test")}
    stream = TaskStream(
        name=f"split-{'mnist' if dataset == 'MNIST' else 'fashion'}-{setting}",
        setting=setting,
        num_classes=10 if setting == "class" else len(pairs[0]),
    )
    for t, group in enumerate(pairs):
        parts = {}
        for s, (images, labels) in splits.items():
            mask = torch.zeros_like(labels, dtype=torch.bool)
            for c in group:
                mask |= labels == c
            x, y = images[mask], labels[mask]
            if limit is not None:
                x, y = x[:limit], y[:limit]
            if setting != "class":
                y = torch.searchsorted(torch.tensor(sorted(group)), y)
            parts[s] = _tensor_dataset(_to_float(x, normalize, dataset), y, t if setting == "task" else None)
        train, val = split_validation(parts["train"], val_fraction, g)
        stream.tasks.append(Task(task_id=t, classes=tuple(group), train=train, val=val, test=parts["test"]))
    return stream


def permutations(num_tasks: int, seed: int = 0, first_identity: bool = True, size: int = 784) -> list[Tensor]:
    """The pixel permutations of permuted MNIST: fixed by ``seed``, different per task."""
    check_positive_int(num_tasks, "num_tasks")
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(size, generator=g) for _ in range(num_tasks)]
    if first_identity:
        perms[0] = torch.arange(size)
    return perms


def permuted_stream(
    num_tasks: int = 10,
    *,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    first_identity: bool = True,
    normalize: bool = False,
    val_fraction: float = 0.0,
    limit: int | None = None,
) -> TaskStream:
    """Permuted MNIST: ``num_tasks`` tasks, each MNIST under its own seeded pixel permutation (10 classes).

    ``val_fraction`` of each task's training images are held out as ``Task.val`` (a different seeded draw per
    task); ``limit`` keeps the first ``limit`` training and test images before that split.
    """
    check_real(val_fraction, "val_fraction", low=0.0, high=1.0, high_open=True)
    if limit is not None:
        check_positive_int(limit, "limit")
    perms = permutations(num_tasks, seed, first_identity)
    g = torch.Generator().manual_seed(seed + 1)
    splits = {s: load_split("MNIST", s, root) for s in ("train", "test")}
    if limit is not None:
        splits = {s: (x[:limit], y[:limit]) for s, (x, y) in splits.items()}
    stream = TaskStream(name="permuted-mnist", setting="domain", num_classes=10)
    for t, perm in enumerate(perms):
        parts = {}
        for s, (images, labels) in splits.items():
            x = _to_float(images, normalize, "MNIST").flatten(1)[:, perm].view(-1, 1, 28, 28)
            parts[s] = _tensor_dataset(x, labels, None)
        train, val = split_validation(parts["train"], val_fraction, g)
        stream.tasks.append(Task(task_id=t, classes=tuple(range(10)), train=train, val=val, test=parts["test"]))
    return stream


def synthetic_stream(
    num_tasks: int = 3, n_train: int = 256, n_test: int = 128, *, seed: int = 0, setting: str = "task",
    val_fraction: float = 0.0,
) -> TaskStream:
    """A tiny task-incremental stream of MNIST-shaped Gaussian blobs (2 classes per task), for tests and demos.

    Class ``c`` of task ``t`` is a random 28x28 template plus noise; a 2x256 MLP separates them in one epoch.
    With ``val_fraction`` > 0 that fraction of each task's ``n_train`` examples is held out as ``Task.val``
    (drawn by a generator of its own, so the examples themselves do not depend on ``val_fraction``).
    """
    check_positive_int(num_tasks, "num_tasks")
    check_positive_int(n_train, "n_train")
    check_positive_int(n_test, "n_test")
    check_real(val_fraction, "val_fraction", low=0.0, high=1.0, high_open=True)
    g = torch.Generator().manual_seed(seed)
    g_val = torch.Generator().manual_seed(seed + 1)
    stream = TaskStream(name="synthetic", setting=setting, num_classes=2)
    for t in range(num_tasks):
        templates = torch.rand(2, 1, 28, 28, generator=g)
        parts = []
        for n in (n_train, n_test):
            y = torch.randint(0, 2, (n,), generator=g)
            x = (templates[y] + 0.3 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 1)
            parts.append(_tensor_dataset(x, y, t if setting == "task" else None))
        train, val = split_validation(parts[0], val_fraction, g_val)
        stream.tasks.append(Task(task_id=t, classes=(2 * t, 2 * t + 1), train=train, val=val, test=parts[1]))
    return stream


def make_stream(scenario: str | Scenario, **kwargs) -> TaskStream:
    """Build a named scenario's stream (see :class:`Scenario`); ``kwargs`` go to the builder.

    ``permuted-mnist`` takes ``num_tasks`` (default 10); the split scenarios take ``pairs``.
    """
    sc = as_enum(Scenario, scenario, "scenario")
    if sc is Scenario.PERMUTED_MNIST:
        return permuted_stream(**kwargs)
    if sc is Scenario.SYNTHETIC:
        kwargs.pop("root", None)
        kwargs.pop("limit", None)
        return synthetic_stream(**kwargs)
    return split_stream(sc.dataset, sc.setting, **kwargs)
