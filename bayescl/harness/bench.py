"""The benchmark harness: a recipe over a scenario with a plain Lightning Trainer, one ``fit`` per task.

After each task the model is tested on every task of the stream, which fills one row of the accuracy matrix; when the
tasks hold validation data (``val_fraction`` > 0, by default 10 % of each task's training data) it is evaluated on
every task's validation data too, which fills the validation accuracy matrix (the only one that may choose a
hyperparameter: :mod:`bayescl.harness.tune`). Results go to ``benchmarks/results/<scenario>/<strategy>.json``;
:mod:`bayescl.harness.report` turns the JSON files of a scenario into a markdown table and plots.

Protocol defaults: Adam 1e-3, batch 64, 5 epochs per task, pixels in [0, 1], 10 % of each task's training data held
out for validation (seeded by the run's seed; results written before ``val_fraction`` existed trained on all of it,
as ``--val-fraction 0`` does); models (``--model mlp``, the default): multi-head MLP 2x256 (task-IL), MLP 2x256
(domain/class-IL), MLP 2x100 (permuted MNIST); ``--model cnn`` / ``cnn-bn``: the SmallCNN without / with BatchNorm,
with one head per task in task-IL.
"""

from __future__ import annotations

import json
import logging
import resource
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from bayescl._checks import as_enum, check_positive_int, check_real
from bayescl.harness.avalanche_recipes import check_harness_recipe
from bayescl.harness.data import Scenario, TaskStream, make_stream
from bayescl.harness.metrics import AccuracyMatrix, mean_std, summarize
from bayescl.harness.models import MLP, MultiHeadMLP, SmallCNN
from bayescl.harness.module import ClassifierModule
from bayescl.harness.recipes import Recipe, load_recipe
from bayescl.lightning.resumable import ResumableDataLoader
from bayescl.methods.uncertainty import evaluate_uncertainty, posterior_for

#: the networks ``BenchConfig.model`` / ``--model`` choose from (see :func:`default_model`)
MODELS = ("mlp", "cnn", "cnn-bn")


def default_model(stream: TaskStream, kind: str = "mlp") -> nn.Module:
    """The reference network of a stream's protocol (see the module docstring).

    Args:
        stream: the task stream; task-incremental streams (``stream.with_task_id``) get one head per task of
            ``stream.num_classes`` outputs, the others one head.
        kind: ``"mlp"`` (the protocol's MLP), ``"cnn"`` (:class:`~bayescl.harness.models.SmallCNN`) or ``"cnn-bn"``
            (the SmallCNN with a BatchNorm after each conv layer).

    Raises:
        ValueError: ``kind`` is not one of :data:`MODELS`.
    """
    if kind not in MODELS:
        raise ValueError(f"model={kind!r} is not valid; allowed: {', '.join(MODELS)}.")
    if kind in ("cnn", "cnn-bn"):
        return SmallCNN(num_classes=stream.num_classes, num_tasks=len(stream) if stream.with_task_id else None,
                        batchnorm=kind == "cnn-bn")
    if stream.with_task_id:
        return MultiHeadMLP(hidden=(256, 256), num_tasks=len(stream), classes_per_task=stream.num_classes)
    hidden = (100, 100) if "permuted" in stream.name.lower() else (256, 256)
    return MLP(hidden=hidden, num_classes=stream.num_classes)


@dataclass
class BenchConfig:
    """Everything one benchmark run depends on (stored in the JSON with the results).

    ``val_fraction`` of each task's training data is held out for validation (seeded by the run's seed; 0: none).
    ``evaluate_test=False`` evaluates on the validation data only and never builds a test loader (the tuning phase
    of :mod:`bayescl.harness.tune`); it needs ``val_fraction`` > 0 and ``uncertainty=False``.
    """

    scenario: str
    strategy: str
    seeds: int = 1
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    model: str = "mlp"
    num_tasks: int | None = None
    limit: int | None = None
    root: str | None = None
    first_seed: int = 0
    progress: bool = False
    uncertainty: bool = True
    resume: bool = False
    val_fraction: float = 0.1
    evaluate_test: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.scenario.startswith("avalanche:"):
            as_enum(Scenario, self.scenario, "scenario")
        check_positive_int(self.seeds, "seeds")
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_real(self.lr, "lr", low=0.0, low_open=True)
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r} is not valid; allowed: {', '.join(MODELS)}.")
        if self.num_tasks is not None:
            check_positive_int(self.num_tasks, "num_tasks")
        if self.limit is not None:
            check_positive_int(self.limit, "limit")
        check_real(self.val_fraction, "val_fraction", low=0.0, high=1.0, high_open=True)
        if not self.evaluate_test and self.val_fraction == 0:
            raise ValueError("evaluate_test=False needs validation data to evaluate on; val_fraction=0 holds none "
                             "(allowed: val_fraction in (0, 1)).")
        if not self.evaluate_test and self.uncertainty:
            raise ValueError("uncertainty=True evaluates the posterior on test data; with evaluate_test=False the "
                             "test data must not be read: set uncertainty=False.")


def check_runnable(recipe: Recipe) -> None:
    """Refuse, before any training, a recipe the harness cannot run as written.

    Raises:
        ValueError: an Avalanche recipe (it would train plain fine-tuning under its name), or a ``module:`` that
            sets ``lr`` (the learning rate is the run's, ``BenchConfig.lr`` / ``--lr``).
    """
    check_harness_recipe(recipe)
    if "lr" in recipe.module:
        raise ValueError(f"strategy={recipe.name!r} sets module.lr={recipe.module['lr']!r}; the learning rate is "
                         "the run's (BenchConfig.lr, --lr): remove it from the recipe's 'module'.")


def _stream(cfg: BenchConfig, seed: int) -> TaskStream:
    if cfg.scenario.startswith("avalanche:"):
        from bayescl.harness.avalanche_stream import make_avalanche_stream

        return make_avalanche_stream(cfg.scenario, root=cfg.root, seed=seed, num_tasks=cfg.num_tasks,
                                     limit=cfg.limit, val_fraction=cfg.val_fraction)
    kwargs: dict[str, Any] = {"seed": seed, "val_fraction": cfg.val_fraction}
    sc = as_enum(Scenario, cfg.scenario, "scenario")
    if sc.needs_files:
        kwargs.update(root=cfg.root, limit=cfg.limit)
    if cfg.num_tasks is not None:
        if sc in (Scenario.PERMUTED_MNIST, Scenario.SYNTHETIC):
            kwargs["num_tasks"] = cfg.num_tasks
        else:
            from bayescl.harness.data import SPLIT_PAIRS

            kwargs["pairs"] = SPLIT_PAIRS[: cfg.num_tasks]
    return make_stream(sc, **kwargs)


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")


def _run_config(cfg: BenchConfig) -> dict[str, Any]:
    """The configuration a result or a seed's progress is written with (JSON-normalised), and compared on resume."""
    return json.loads(json.dumps({k: v for k, v in vars(cfg).items() if k not in ("progress", "resume")}))


def _load_progress(state_dir: Path | None, cfg: BenchConfig) -> dict[str, Any] | None:
    """A part-way seed's progress, or ``None``; raises if it was made with another configuration (its first tasks
    would be measured one way and the rest another, e.g. without and then with the uncertainty records)."""
    path = None if state_dir is None else state_dir / "progress.json"
    if path is None or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("config") != _run_config(cfg):
        raise ValueError(f"--resume: the part-way seed in {state_dir} was run with another configuration "
                         f"({saved.get('config')}); rerun without --resume (it starts the seed again), or with the "
                         "same arguments.")
    return saved


def _save_progress(state_dir: Path, cfg: BenchConfig, trainer: pl.Trainer, module: ClassifierModule, done: int,
                   fit_seconds: float, steps: int, uncertainty: list[dict[str, Any]],
                   val_matrix: AccuracyMatrix | None) -> None:
    """After task ``done - 1`` is evaluated: its checkpoint (the committed posterior), then what the seed has
    measured so far (the test and validation accuracy counts, timings, uncertainty records), each written whole
    before it replaces the last."""
    state_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(state_dir / "tested.ckpt.tmp")
    (state_dir / "tested.ckpt.tmp").replace(state_dir / "tested.ckpt")
    doc = {"tasks_done": done, "correct": module.acc_matrix.correct.tolist(), "total": module.acc_matrix.total.tolist(),
           "fit_seconds": fit_seconds, "steps": steps, "uncertainty": uncertainty, "config": _run_config(cfg)}
    if val_matrix is not None:
        doc.update(val_correct=val_matrix.correct.tolist(), val_total=val_matrix.total.tolist())
    (state_dir / "progress.json.tmp").write_text(json.dumps(doc))
    (state_dir / "progress.json.tmp").replace(state_dir / "progress.json")


def _evaluate(trainer: pl.Trainer, module: ClassifierModule, loaders: list, matrix: AccuracyMatrix) -> None:
    """Fill ``matrix`` (row ``module.stage``) from ``loaders`` (one per task) through the module's own
    ``test_step``: validation accuracy is measured exactly as test accuracy is."""
    kept = module.acc_matrix
    module.acc_matrix = matrix
    try:
        trainer.test(module, dataloaders=loaders, verbose=False)
    finally:
        module.acc_matrix = kept


def _matrix(metric: AccuracyMatrix) -> torch.Tensor:
    """The metric's ``(T, T)`` matrix (torchmetrics returns a 1-task stream's as a scalar)."""
    return metric.compute().reshape(metric.num_tasks, metric.num_tasks)


def _seen(R: torch.Tensor, i: int) -> str:
    seen = R[i, : i + 1]
    return f"{100 * float(seen.mean()):.2f} [{' '.join(f'{100 * float(a):.1f}' for a in seen)}]"


def run_seed(cfg: BenchConfig, recipe: Recipe, seed: int, log=print, state_dir: Path | None = None,
             resume: bool = False) -> dict[str, Any]:
    """Run one seed of a recipe over a stream; returns its accuracy matrices and timings.

    After each task the model is evaluated on every task's test data (``accuracy_matrix``, unless
    ``cfg.evaluate_test`` is false: then no test loader is built) and, when the tasks hold validation data, on
    every task's validation data (``val_accuracy_matrix``, with ``val_avg_accuracy``, ``val_bwt``,
    ``val_forgetting``).

    With ``state_dir``, the seed's progress is saved there after every tested task (and removed when the seed
    finishes); with ``resume`` a seed found there part-way continues after its last tested task
    (``fit(ckpt_path=...)`` of a committed checkpoint: the next task starts with a full budget from the saved weights
    and posterior, as :func:`bayescl.lightning.resume_point` says).
    """
    check_runnable(recipe)
    pl.seed_everything(seed, verbose=False)
    stream = _stream(cfg, seed)
    module = ClassifierModule(default_model(stream, cfg.model), num_tasks=len(stream), lr=cfg.lr,
                              **recipe.module)
    callbacks = recipe.build_callbacks()
    test_loaders = [t.test_dataloader() for t in stream] if cfg.evaluate_test else None
    has_val = all(t.val is not None for t in stream)
    val_loaders = [t.val_dataloader() for t in stream] if has_val else None
    val_matrix = AccuracyMatrix(len(stream)) if has_val else None
    fit_seconds = 0.0
    steps = 0
    uncertainty: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    done, resume_ckpt = 0, None
    if state_dir is not None and not resume:
        shutil.rmtree(state_dir, ignore_errors=True)  # a stale run's progress is not this run's
    if (saved := _load_progress(state_dir, cfg)) is not None:
        done, fit_seconds, steps, uncertainty = saved["tasks_done"], saved["fit_seconds"], saved["steps"], \
            saved["uncertainty"]
        module.acc_matrix.correct = torch.tensor(saved["correct"], dtype=torch.long)
        module.acc_matrix.total = torch.tensor(saved["total"], dtype=torch.long)
        if val_matrix is not None:
            val_matrix.correct = torch.tensor(saved["val_correct"], dtype=torch.long)
            val_matrix.total = torch.tensor(saved["val_total"], dtype=torch.long)
        resume_ckpt = str(state_dir / "tested.ckpt")
        log(f"  seed {seed}: resuming after task {done}/{len(stream)} ({resume_ckpt})")
    for i, task in enumerate(stream):
        if i < done:
            continue
        data = stream.cumulative_train(i) if recipe.cumulative else task.train
        if not recipe.cumulative:  # callbacks that hold data out of training (VCL coresets) take it here
            for cb in callbacks:
                if hasattr(cb, "prepare_task_data"):
                    data = cb.prepare_task_data(data, task=i)
        # the order of each epoch is drawn from (seed, epoch): different seeds, different orders; resumable exactly
        loader = ResumableDataLoader(data, batch_size=cfg.batch_size, shuffle=True, seed=seed)
        trainer = pl.Trainer(
            max_epochs=cfg.epochs, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=cfg.progress,
            num_sanity_val_steps=0, **recipe.trainer,
        )
        t_fit = time.perf_counter()
        trainer.fit(module, loader, ckpt_path=resume_ckpt if i == done else None)
        fit_seconds += time.perf_counter() - t_fit
        steps += trainer.global_step
        module.stage = i
        line = f"  seed {seed} task {i + 1}/{len(stream)}:"
        if test_loaders is not None:
            trainer.test(module, dataloaders=test_loaders, verbose=False)
            line += f" mean acc on seen tasks {_seen(_matrix(module.acc_matrix), i)}"
        if val_matrix is not None:
            _evaluate(trainer, module, val_loaders, val_matrix)
            line += f" {'(validation' if test_loaders is not None else 'mean validation acc on seen tasks'} " \
                    f"{_seen(_matrix(val_matrix), i)}{')' if test_loaders is not None else ''}"
        if cfg.uncertainty:
            uncertainty.append(evaluate_uncertainty(module, posterior_for(callbacks, module), test_loaders,
                                                    stage=i, seed=seed))
        if state_dir is not None:
            _save_progress(state_dir, cfg, trainer, module, i + 1, fit_seconds, steps, uncertainty, val_matrix)
        log(line)
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)  # the seed's result goes into the JSON
    end_task = sum(float(getattr(cb, "end_task_seconds", 0.0)) for cb in callbacks)
    result: dict[str, Any] = {"seed": seed}
    if test_loaders is not None:
        R = _matrix(module.acc_matrix)
        result.update(accuracy_matrix=R.tolist(), **summarize(R))
    if val_matrix is not None:
        V = _matrix(val_matrix)
        result.update(val_accuracy_matrix=V.tolist(), **{f"val_{k}": v for k, v in summarize(V).items()})
    return {
        **result,
        "wall_seconds": time.perf_counter() - t0,
        "fit_seconds": fit_seconds,
        "optimizer_steps": steps,
        # time inside fit spent closing tasks (curvature passes); the rest is training steps
        "end_task_seconds": end_task,
        "step_ms": 1000 * (fit_seconds - end_task) / max(1, steps),
        **({"uncertainty": uncertainty} if uncertainty else {}),
    }


def _aggregate(result: dict[str, Any]) -> None:
    """The accuracy matrices and the mean ± std of every per-seed number, from ``result["per_seed"]``."""
    runs = result["per_seed"]
    if not runs:
        return
    for key in ("accuracy_matrix", "val_accuracy_matrix"):
        if key in runs[0]:
            result[key] = [r[key] for r in runs]
    for key in ("avg_accuracy", "bwt", "forgetting", "val_avg_accuracy", "val_bwt", "val_forgetting",
                "wall_seconds", "fit_seconds", "end_task_seconds", "step_ms"):
        if key in runs[0]:
            result[key] = mean_std([r[key] for r in runs])


def run_benchmark(cfg: BenchConfig, out_dir: str | Path | None = "benchmarks/results", log=print,
                  command: str | None = None, *, name: str | None = None,
                  header: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``cfg.seeds`` seeds, write the JSON (updated after every finished seed) and return the results.

    Args:
        cfg: the run's configuration (validated first).
        out_dir: results folder; the JSON is ``<out_dir>/<scenario>/<name>.json`` (``None``: nothing written).
        log: receives one progress line per task and per seed.
        command: the command line recorded in the JSON (default: this process's).
        name: the result's ``strategy`` and file name (default: the recipe's name).
        header: more top-level entries of the JSON (e.g. ``tune``: how the recipe was chosen).
    """
    cfg.validate()
    recipe = load_recipe(cfg.strategy)
    check_runnable(recipe)  # before any training or output
    name = name or recipe.name
    _quiet_lightning()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = None
    if out_dir is not None:
        path = Path(out_dir) / cfg.scenario.replace(":", "-") / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "scenario": cfg.scenario,
        "strategy": name,
        "description": recipe.description,
        "command": command or "bayescl " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "config": _run_config(cfg),
        **(header or {}),
        "seeds": [],
        "per_seed": [],
    }
    log(f"{name} on {cfg.scenario}: {cfg.seeds} seed(s), {cfg.epochs} epoch(s) per task, "
        f"batch {cfg.batch_size}, {100 * cfg.val_fraction:g} % of each task's training data for validation"
        f"{'' if cfg.evaluate_test else ' (validation only: no test data read)'}")
    if cfg.resume and path is not None and path.is_file():  # the seeds that finished stay as they are
        previous = json.loads(path.read_text())
        if previous.get("config") != result["config"]:
            raise ValueError(f"--resume: {path} was written with another configuration ({previous.get('config')}); "
                             "rerun without --resume, or with the same arguments.")
        result["seeds"], result["per_seed"] = previous.get("seeds", []), previous.get("per_seed", [])
        _aggregate(result)
        if "peak_rss_mb" in previous:
            result["peak_rss_mb"] = previous["peak_rss_mb"]
    ran = False
    for s in range(cfg.first_seed, cfg.first_seed + cfg.seeds):
        if s in result["seeds"]:
            log(f"  seed {s}: finished in {path}, kept (--resume)")
            continue
        state_dir = None if path is None else path.parent / "_resume" / name / f"seed-{s}"
        run = run_seed(cfg, recipe, s, log=log, state_dir=state_dir, resume=cfg.resume)
        ran = True
        result["seeds"].append(s)
        result["per_seed"].append(run)
        _aggregate(result)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if path is not None:
            path.write_text(json.dumps(result, indent=1))
        scores = [f"{label} {100 * run[key]:.2f}" for key, label in
                  (("avg_accuracy", "avg accuracy"), ("bwt", "BWT"), ("val_avg_accuracy", "validation avg accuracy"))
                  if key in run]
        log(f"  seed {s}: {', '.join(scores)}, {run['wall_seconds']:.1f} s")
    if path is not None and not ran and result["seeds"]:  # every seed kept: the header (command, tune) is this run's
        path.write_text(json.dumps(result, indent=1))
    result["json_path"] = str(path) if path else None
    return result
