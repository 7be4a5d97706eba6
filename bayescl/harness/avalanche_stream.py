"""Avalanche benchmarks as bayescl task streams, for a Lightning loop or the benchmark harness.

:func:`stream_from_benchmark` turns an Avalanche benchmark's train/test streams into a
:class:`~bayescl.harness.data.TaskStream` (one :class:`~bayescl.harness.data.Task` per experience, batches
``(x, y, task_id)`` for task-incremental benchmarks, ``(x, y)`` otherwise, task labels and label values kept), so a
Lightning loop with the bayescl callbacks, or ``bayescl bench --scenario avalanche:SplitMNIST``, runs any Avalanche
scenario. :func:`make_avalanche_stream` builds one from a spec such as ``"avalanche:SplitMNIST"``.

The Avalanche *plugins* live in :mod:`bayescl.avalanche` (an adapter); this module is the harness's side and needs
the same extra (``pip install "bayescl[avalanche]"``) only when a benchmark is built from a spec.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from bayescl._checks import check_positive_int, check_real
from bayescl.harness.data import Task, TaskStream, data_root, split_validation

__all__ = ["PRESETS", "ExperienceDataset", "make_avalanche_stream", "stream_from_benchmark"]


class ExperienceDataset(Dataset):
    """An Avalanche experience's dataset as bayescl items: ``(x, y, task_id)`` or ``(x, y)`` (tensors).

    Args:
        dataset: an Avalanche dataset (items ``(x, y, ..., t)``) or any dataset of ``(x, y)`` tuples.
        with_task_id: keep the task label as the third element.
        task_label: the label used when an item carries none.
    """

    def __init__(self, dataset: Dataset, with_task_id: bool, task_label: int = 0) -> None:
        self.dataset = dataset
        self.with_task_id = bool(with_task_id)
        self.task_label = int(task_label)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        item = self.dataset[i]
        x, y = item[0], torch.as_tensor(item[1], dtype=torch.long)
        if not self.with_task_id:
            return x, y
        t = item[-1] if len(item) >= 3 else self.task_label  # Avalanche puts the task label last
        return x, y, torch.as_tensor(t, dtype=torch.long)


def _task_labels(exp: Any) -> list[int]:
    """The sorted task labels of an experience (``[0]`` when it records none)."""
    labels = getattr(exp, "task_labels", None)
    if labels is None:
        attr = getattr(exp.dataset, "targets_task_labels", None)
        labels = list(attr.uniques) if attr is not None else [0]
    return sorted(int(t) for t in labels)


def _label_set(exp: Any) -> set[int]:
    """The class labels of an experience (from its metadata when it has some, else from its targets)."""
    classes = getattr(exp, "classes_in_this_experience", None)
    if classes is not None:
        return {int(c) for c in classes}
    ds = exp.dataset
    targets = getattr(ds, "targets", None)
    if targets is None:
        return {int(ds[i][1]) for i in range(len(ds))}
    uniq = getattr(targets, "uniques", None)
    return {int(v) for v in (uniq if uniq is not None else targets)}


def _materialize(ds: Dataset) -> TensorDataset:
    """Copy a dataset of tensor tuples into one ``TensorDataset``."""
    cols: list[list[Tensor]] | None = None
    for batch in DataLoader(ds, batch_size=1024, shuffle=False):
        if cols is None:
            cols = [[] for _ in batch]
        for c, v in zip(cols, batch):
            c.append(v)
    if cols is None:
        raise ValueError("an experience of the benchmark has an empty dataset.")
    return TensorDataset(*(torch.cat(c) for c in cols))


def _limit(ds: Dataset, limit: int | None, generator: torch.Generator) -> Dataset:
    """A random subset of ``limit`` items in their original order (``ds`` itself when it is not larger)."""
    n = len(ds)  # type: ignore[arg-type]
    if limit is None or n <= limit:
        return ds
    return Subset(ds, torch.randperm(n, generator=generator)[:limit].sort().values.tolist())


def stream_from_benchmark(
    benchmark: Any,
    name: str | None = None,
    *,
    with_task_id: bool | None = None,
    num_tasks: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    materialize: bool = False,
    val_fraction: float = 0.0,
    train_stream: str = "train_stream",
    test_stream: str = "test_stream",
) -> TaskStream:
    """A bayescl :class:`~bayescl.harness.data.TaskStream` over an Avalanche benchmark (one task per experience).

    The setting is ``"task"`` with task labels; otherwise ``"domain"`` when every experience has the same label
    set and ``"class"`` when they differ. ``num_classes`` is the number of outputs a head needs: the largest
    label in an experience plus one (task), in the whole stream plus one (domain/class). ``Task.classes`` are the
    original class ids when the benchmark records them (``original_classes_in_exp``), else the labels.

    Args:
        benchmark: an Avalanche benchmark (``CLScenario``) with train and test streams of equal length.
        name: the stream's name (default ``"avalanche:<class name>"``).
        with_task_id: batches carry the task label (task-incremental). Default: the benchmark's train
            experiences have more than one distinct task label.
        num_tasks: keep only the first ``num_tasks`` experiences.
        limit: keep a random subset (seeded by ``seed``, original order) of ``limit`` training and test
            examples per experience; not the first ones, since Avalanche's experiences are often sorted by class.
        seed: seed of the ``limit`` subsets.
        materialize: copy each experience into a ``TensorDataset`` once (fast epochs; costs memory).
        val_fraction: fraction of each experience's training data (after ``limit``) held out as ``Task.val``,
            drawn with its own generator seeded by ``seed`` (so the ``limit`` subsets do not depend on it).
        train_stream: attribute name of the training stream.
        test_stream: attribute name of the test stream.

    Returns:
        The task stream; test data use the experiences' eval transforms.

    Raises:
        ValueError: the streams differ in length, the benchmark has no training experience, an experience
            is empty, or ``val_fraction`` is outside [0, 1) or leaves no training example.
        TypeError: ``num_tasks`` or ``limit`` is not an int.
    """
    trains = list(getattr(benchmark, train_stream))
    tests = list(getattr(benchmark, test_stream))
    if len(trains) != len(tests):
        raise ValueError(f"benchmark has {len(trains)} {train_stream} experiences but {len(tests)} {test_stream} "
                         "ones; stream_from_benchmark needs one test experience per training experience.")
    if num_tasks is not None:
        check_positive_int(num_tasks, "num_tasks")
        trains, tests = trains[:num_tasks], tests[:num_tasks]
    if limit is not None:
        check_positive_int(limit, "limit")
    check_real(val_fraction, "val_fraction", low=0.0, high=1.0, high_open=True)
    if not trains:
        raise ValueError("benchmark has no training experience.")
    task_labels = [_task_labels(e) for e in trains]
    if with_task_id is None:
        with_task_id = len({t for ts in task_labels for t in ts}) > 1
    label_sets = [_label_set(e) for e in trains]
    if with_task_id:
        setting = "task"
    else:
        setting = "domain" if all(s == label_sets[0] for s in label_sets) else "class"
    num_classes = max(max(s) for s in label_sets) + 1
    original = getattr(benchmark, "original_classes_in_exp", None)
    g = torch.Generator().manual_seed(int(seed))
    g_val = torch.Generator().manual_seed(int(seed) + 1)
    stream = TaskStream(name=name or f"avalanche:{type(benchmark).__name__}", setting=setting,
                        num_classes=num_classes)
    for i, (tr, te) in enumerate(zip(trains, tests)):
        tl = task_labels[i][0] if len(task_labels[i]) == 1 else 0
        parts = []
        for exp in (tr, te):
            ds = exp.dataset.eval() if exp is te and hasattr(exp.dataset, "eval") else exp.dataset
            wrapped: Dataset = _limit(ExperienceDataset(ds, with_task_id, tl), limit, g)
            parts.append(_materialize(wrapped) if materialize else wrapped)
        classes = sorted(int(c) for c in original[i]) if original is not None else sorted(label_sets[i])
        train, val = split_validation(parts[0], val_fraction, g_val)
        stream.tasks.append(Task(task_id=i, classes=tuple(classes), train=train, val=val, test=parts[1]))
    return stream


#: Avalanche benchmarks with bayescl's protocol defaults (pixels in [0, 1], task-IL local labels 0/1 for splits).
PRESETS: dict[str, dict[str, Any]] = {
    "SplitMNIST": {"n_experiences": 5, "return_task_id": True, "fixed_class_order": list(range(10)),
                   "class_ids_from_zero_in_each_exp": True, "train_transform": None, "eval_transform": None},
    "SplitFMNIST": {"n_experiences": 5, "return_task_id": True, "fixed_class_order": list(range(10)),
                    "class_ids_from_zero_in_each_exp": True, "train_transform": None, "eval_transform": None},
    "PermutedMNIST": {"n_experiences": 10, "train_transform": None, "eval_transform": None},
}


def _parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"avalanche:<Name>[:key=value,...]"`` -> ``(<Name>, {key: YAML value})``."""
    import yaml

    body = spec.removeprefix("avalanche:")
    bench, _, opts = body.partition(":")
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in opts.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"scenario={spec!r}: option {part!r} is not of the form key=value.")
        options[key.strip()] = yaml.safe_load(value)
    return bench.strip(), options


def make_avalanche_stream(
    spec: str,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    *,
    num_tasks: int | None = None,
    limit: int | None = None,
    materialize: bool = True,
    val_fraction: float = 0.0,
) -> TaskStream:
    """Build an Avalanche classic benchmark from a spec and return it as a :class:`~bayescl.harness.data.TaskStream`.

    Args:
        spec: ``"avalanche:<Name>[:key=value,...]"``: ``<Name>`` a function of ``avalanche.benchmarks.classic``;
            the options (YAML values) are its keyword arguments, over the presets of :data:`PRESETS`
            (``SplitMNIST`` = task-IL 0/1 … 8/9 with local labels, like bayescl's ``split-mnist-task``;
            ``SplitMNIST:return_task_id=false`` = domain-IL; add ``class_ids_from_zero_in_each_exp=false`` for
            class-IL; ``PermutedMNIST``, 10 experiences, seeded by ``seed``). Pixels are in [0, 1] (no
            normalisation) unless the options give transforms.
        root: the data root, else ``$BAYESCL_DATA``, else ``./data`` (torchvision layout, ``<root>/MNIST/raw/...``).
        seed: the benchmark's seed and that of the ``limit`` subsets.
        num_tasks: keep only the first ``num_tasks`` experiences.
        limit: training and test examples kept per experience (see :func:`stream_from_benchmark`).
        materialize: copy each experience into a ``TensorDataset`` once.
        val_fraction: fraction of each experience's training data held out as ``Task.val`` (seeded by ``seed``).

    Raises:
        ImportError: avalanche-lib is not installed.
        ValueError: ``spec`` names no benchmark of ``avalanche.benchmarks.classic`` or has a malformed option.
    """
    try:
        from avalanche.benchmarks import classic
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"scenario={spec!r} needs Avalanche (avalanche-lib >= 0.6): "
                          'pip install "bayescl[avalanche]".') from exc

    name, options = _parse_spec(spec)
    factory = getattr(classic, name, None)
    if not callable(factory) or name.startswith("_"):
        raise ValueError(f"scenario={spec!r}: {name!r} is not a benchmark of avalanche.benchmarks.classic; "
                         f"tested: {', '.join(PRESETS)}.")
    kwargs = {**PRESETS.get(name, {}), **options}
    kwargs.setdefault("dataset_root", str(data_root(root)))
    kwargs.setdefault("seed", seed)
    n_exp = kwargs.pop("n_experiences", None)
    benchmark = factory(n_exp, **kwargs) if n_exp is not None else factory(**kwargs)
    return stream_from_benchmark(benchmark, name=f"avalanche:{name}", num_tasks=num_tasks, limit=limit,
                                 seed=seed, materialize=materialize, val_fraction=val_fraction)
