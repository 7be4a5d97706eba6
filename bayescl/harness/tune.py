r"""``bayescl tune``: choose a recipe's hyperparameters on validation data, then run the whole stream.

The protocol (after Chaudhry et al. 2019, *Efficient Lifelong Learning with A-GEM*, section 5: hyperparameters are
cross-validated on the first :math:`T_{cv}` tasks only):

1. Every task's training data is split, seeded by the run's seed, into train and validation (``val_fraction`` of it,
   10 % by default; :func:`bayescl.harness.data.split_validation`).
2. Tuning: each candidate of the grid is trained on a stream of the first ``tune_tasks`` tasks (``tune_seeds``
   seeds from ``first_seed``, ``tune_epochs`` epochs per task) and evaluated after each task on the validation data
   of every task (:class:`~bayescl.harness.bench.BenchConfig` with ``evaluate_test=False``: no test loader is built).
   Its score is the validation average accuracy after the last tuning task, averaged over the tune seeds,

   .. math:: s = \frac1{|S|}\sum_{s\in S} \frac1{T_{cv}} \sum_{j<T_{cv}} V^{(s)}_{T_{cv}-1,\,j},

   with :math:`V` the validation accuracy matrix (rows: after training task :math:`i`; columns: task :math:`j`).
3. Choice (:mod:`bayescl.harness.tune_choice`): the candidate with the highest score (the first in grid order on
   a tie). With ``min_learned = p`` only the candidates that *learn* every task are eligible: each task's
   validation accuracy right after training it (the diagonal :math:`V_{jj}`, every tune seed) must reach
   :math:`p`. Average accuracy alone rewards a recipe that holds the old tasks by not learning the new ones (on
   split-MNIST domain-IL a Kronecker Laplace at Adam 3e-5 scores 82 % on validation while learning its last task
   to 44 %, below chance). If no candidate is eligible the best of all is chosen and the JSON says so.
4. Final run: the chosen candidate over the whole stream for ``seeds`` seeds, tested on the test data exactly as
   ``bayescl bench`` does. Unlike Chaudhry et al., who report on the remaining tasks only, the final run covers the
   whole stream (tuning tasks included) so that its numbers compare with ``bayescl bench``'s; no test data chose
   anything.

The grid is a grid file (``benchmarks/grids/*.yaml``, :mod:`bayescl.harness.recipes`) or ``KEY=v1,v2,...`` lists
merged into the base recipe's first callback's ``init_args`` (the cartesian product of the lists; values are YAML
scalars). One key is not a callback argument: ``lr=v1,v2,...`` lists learning rates of the run (the optimizer's,
``--lr``); every variant is tried at each (beside a grid file too), and the final run uses the chosen one. A
generated grid is written to ``<out>/_tune/<name>/<scenario>/grid.yaml`` so that every candidate is a
``GRID.yaml#VARIANT`` recipe that ``bayescl bench`` runs as it is. Each candidate's result is written beside it as
soon as it finishes (``<variant>.json``, with the validation matrices); ``resume=True`` keeps the finished ones and
continues a stopped one after its last evaluated task. The final result, ``<out>/<scenario>/<name>.json``, has the
schema of ``bayescl bench``'s (``bayescl report`` reads it) plus a ``tune`` entry: the protocol, the grid, every
candidate's validation score and the choice.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bayescl._checks import check_positive_int
from bayescl.harness.avalanche_recipes import check_harness_recipe
from bayescl.harness.bench import BenchConfig, _run_config, run_benchmark
from bayescl.harness.recipes import _Loader, grid_variants, load_recipe
from bayescl.harness.scenarios import Scenario, default_num_tasks
from bayescl.harness.tune_choice import choose_learned, learned_min

__all__ = ["METRIC", "TuneConfig", "parse_grid", "run_tune", "tune_candidates"]

#: the per-seed number a candidate is scored by (mean over tune seeds)
METRIC = "val_avg_accuracy"
PROTOCOL = "first-tasks validation (Chaudhry et al. 2019)"
#: the protocol's name when the tuning stream is the whole stream
PROTOCOL_ALL = "all-tasks validation"
#: the grid key that lists the run's learning rates (not a callback argument)
LR = "lr"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """``["lam=1,10", "gamma=0.9,1"]`` -> ``{"lam": [1, 10], "gamma": [0.9, 1]}`` (values read as YAML scalars).

    Raises:
        ValueError: a spec is not ``KEY=v1,v2,...``, a key is not an identifier or is repeated, a list is empty or
            holds a value twice.
    """
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"grid={spec!r} is not of the form KEY=v1,v2,... with KEY an init argument name "
                             "(e.g. lam=1,10,100).")
        if key in grid:
            raise ValueError(f"grid key {key!r} is given twice; give all its values in one KEY=v1,v2,... .")
        parsed = [yaml.load(v.strip(), Loader=_Loader) for v in values.split(",") if v.strip()]
        if not parsed:
            raise ValueError(f"grid={spec!r} has no values; allowed: KEY=v1,v2,... with at least one value.")
        if any(a == b for i, a in enumerate(parsed) for b in parsed[i + 1:]):
            raise ValueError(f"grid={spec!r} holds a value twice; each candidate must differ.")
        grid[key] = parsed
    return grid


@dataclass
class TuneConfig:
    """A tuning run: the final run's configuration, the grid and the tuning protocol.

    Attributes:
        run: the final run (scenario, seeds, epochs, ``val_fraction`` ...); ``run.strategy`` is the base recipe
            the ``grid`` lists are merged into (unused with ``grid_file``: leave it ``""``).
        grid: ``KEY -> values`` merged into the base recipe's first callback's ``init_args`` (cartesian product);
            the key ``lr`` lists the run's learning rates instead (each variant at each).
        grid_file: a grid file whose variants are the candidates (instead of ``grid``; ``grid`` may then hold
            ``lr`` only).
        tune_tasks: tasks of the tuning stream (the first ones of the scenario).
        tune_seeds: seeds of each candidate's tuning run (from ``run.first_seed``).
        tune_epochs: epochs per task while tuning (default ``run.epochs``).
        name: the result's name (default: the base recipe's name, or the grid file's stem).
        min_learned: if set, only candidates whose every task reaches this validation accuracy right after it is
            trained (every tune seed) are eligible (``None``: every candidate).
    """

    run: BenchConfig
    grid: dict[str, list[Any]] = field(default_factory=dict)
    grid_file: str | None = None
    tune_tasks: int = 3
    tune_seeds: int = 1
    tune_epochs: int | None = None
    name: str | None = None
    min_learned: float | None = None

    @property
    def epochs(self) -> int:
        return self.run.epochs if self.tune_epochs is None else self.tune_epochs

    def validate(self) -> None:
        """Refuse bad input before any work (the message names the argument and what is allowed)."""
        self.run.validate()
        check_positive_int(self.tune_tasks, "tune_tasks")
        check_positive_int(self.tune_seeds, "tune_seeds")
        if self.tune_epochs is not None:
            check_positive_int(self.tune_epochs, "tune_epochs")
        if self.run.val_fraction == 0:
            raise ValueError("val_fraction=0 holds out no validation data, and tuning must not read the test data; "
                             "allowed: val_fraction in (0, 1), e.g. 0.1.")
        callback_grid = {k: v for k, v in self.grid.items() if k != LR}
        if bool(callback_grid) and bool(self.grid_file) or not (self.grid or self.grid_file):
            raise ValueError("the grid is empty: give KEY=v1,v2,... lists (--grid) or a grid file (--grid-file), "
                             "not both (beside a grid file only lr=... lists) and not neither.")
        for lr in self.grid.get(LR, []):
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"grid lr={lr!r} is not a learning rate; allowed: positive numbers, e.g. "
                                 "lr=0.0001,0.001.")
        if self.grid_file and self.run.strategy:
            raise ValueError(f"strategy={self.run.strategy!r} and grid_file={self.grid_file!r}: a grid file names "
                             "its base recipes itself; give one or the other.")
        if self.grid and not self.grid_file and not self.run.strategy:
            raise ValueError("grid lists need a base recipe (strategy=...) to merge into.")
        total = self.run.num_tasks or _stream_length(self.run.scenario)
        if total is not None and self.tune_tasks > total:
            raise ValueError(f"tune_tasks={self.tune_tasks} is more than the stream's {total} tasks; allowed: "
                             f"1..{total}.")
        if self.min_learned is not None and (isinstance(self.min_learned, bool) or not 0 < self.min_learned <= 1):
            raise ValueError(f"min_learned={self.min_learned!r} is not valid; allowed: an accuracy in (0, 1], e.g. "
                             "0.95 (or None for no requirement).")
        if self.name is not None and not _NAME.match(self.name):
            raise ValueError(f"name={self.name!r} is not valid; allowed: letters, digits, '.', '_', '-'.")


def _stream_length(scenario: str) -> int | None:
    """Tasks in a scenario's default stream (``None`` for an Avalanche benchmark without a preset length)."""
    if not scenario.startswith("avalanche:"):
        return default_num_tasks(Scenario(scenario))
    from bayescl.harness.avalanche_stream import PRESETS, _parse_spec

    bench, options = _parse_spec(scenario)
    n = options.get("n_experiences", PRESETS.get(bench, {}).get("n_experiences"))
    return n if isinstance(n, int) else None


def _variant_name(base: str, combo: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join([base, *(f"{k}{v}" for k, v in combo.items())]))


def _grid_doc(cfg: TuneConfig) -> dict[str, Any]:
    """The grid file's content: the given file's, or one generated from the ``KEY=values`` lists."""
    if cfg.grid_file:
        return {"variants": grid_variants(cfg.grid_file)}
    base = load_recipe(cfg.run.strategy)
    if not base.callbacks and set(cfg.grid) != {LR}:
        raise ValueError(f"strategy={cfg.run.strategy!r} has no callback whose init_args the grid "
                         f"{sorted(cfg.grid)} could set; allowed: a recipe with a callback.")
    keys = [k for k in cfg.grid if k != LR]
    combos = [dict(zip(keys, values)) for values in itertools.product(*(cfg.grid[k] for k in keys))]
    variants = {_variant_name(base.name, combo): {"init_args": combo} for combo in combos}
    if len(variants) != len(combos):
        raise ValueError(f"grid={cfg.grid}: two candidates get the same name; use values that differ as text.")
    return {"base": cfg.run.strategy, "variants": variants}


def _check_candidates(grid_path: Path, names: list[str]) -> None:
    """Every candidate loads, is a harness recipe and builds its callbacks (bad keys or values fail here)."""
    if not names:
        raise ValueError(f"grid {grid_path} has no variants; the grid is empty.")
    for n in names:
        recipe = load_recipe(f"{grid_path}#{n}")
        check_harness_recipe(recipe)
        try:
            recipe.build_callbacks()
        except TypeError as exc:
            raise ValueError(f"candidate {n!r}: its callback does not take these arguments ({exc}).") from exc


def _candidate_done(path: Path, cfg: BenchConfig) -> dict[str, Any] | None:
    """The candidate's finished (or failed) result on disk with the same configuration, else ``None``."""
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("config") != _run_config(cfg):
        return None
    if doc.get("failed") or len(doc.get("seeds", [])) == cfg.seeds:
        return doc
    return None


def _failed_candidate(path: Path, cfg: BenchConfig, exc: Exception) -> dict[str, Any]:
    """Record a candidate whose training raised (e.g. diverged to NaN) so that the grid goes on, and a resumed
    tuning does not train it again."""
    doc = {"config": _run_config(cfg), "failed": f"{type(exc).__name__}: {exc}", "seeds": []}
    path.write_text(json.dumps(doc, indent=1))
    return doc


def _name(cfg: TuneConfig) -> str:
    return cfg.name or (Path(cfg.grid_file).stem if cfg.grid_file else load_recipe(cfg.run.strategy).name)


def tune_candidates(cfg: TuneConfig, out_dir: str | Path, log=print, command: str | None = None) -> dict[str, Any]:
    """Steps 2 and 3 of the protocol: score every candidate on validation data and choose one.

    Reads no test data. Each candidate's result is written to ``<out_dir>/_tune/<name>/<scenario>/<variant>.json``
    as it finishes; with ``cfg.run.resume`` a candidate found there finished (same configuration) is kept.

    Returns:
        The ``tune`` entry of the result: ``protocol``, ``grid``, ``candidates`` (name, recipe, overrides,
        validation score per seed and mean, validation matrices, file) and ``choice``.
    """
    cfg.validate()
    doc = _grid_doc(cfg)
    names = list(doc["variants"])
    with tempfile.TemporaryDirectory() as tmp:  # check every candidate before writing anything
        probe = Path(tmp) / "grid.yaml"
        probe.write_text(yaml.safe_dump(doc, sort_keys=False))
        _check_candidates(Path(cfg.grid_file) if cfg.grid_file else probe, names)
    work = Path(out_dir) / "_tune" / _name(cfg)
    scenario_dir = work / cfg.run.scenario.replace(":", "-")
    scenario_dir.mkdir(parents=True, exist_ok=True)
    if cfg.grid_file:
        grid_path = Path(cfg.grid_file)
    else:
        grid_path = scenario_dir / "grid.yaml"
        grid_path.write_text("# written by bayescl tune: the candidates of --grid " +
                             " ".join(f"{k}={','.join(map(str, v))}" for k, v in cfg.grid.items()) + "\n" +
                             yaml.safe_dump(doc, sort_keys=False))
    seeds = list(range(cfg.run.first_seed, cfg.run.first_seed + cfg.tune_seeds))
    candidates, scores, learned = [], {}, {}
    lrs = cfg.grid.get(LR)
    runs = [(v, None) for v in names] if lrs is None else [(v, float(lr)) for v in names for lr in lrs]
    for k, (variant, lr) in enumerate(runs, 1):
        strategy = f"{grid_path}#{variant}"
        spec = doc["variants"][variant] if lr is None else {**doc["variants"][variant], LR: lr}
        name = variant if lr is None else _variant_name(variant, {LR: lr})
        bc = dataclasses.replace(cfg.run, strategy=strategy, seeds=cfg.tune_seeds, epochs=cfg.epochs,
                                 num_tasks=cfg.tune_tasks, evaluate_test=False, uncertainty=False,
                                 lr=cfg.run.lr if lr is None else lr)
        path = scenario_dir / f"{name}.json"
        res = _candidate_done(path, bc) if cfg.run.resume else None
        kept = res is not None
        what = _changes(spec) or name
        if res is None:
            try:
                res = run_benchmark(bc, out_dir=work, log=lambda m: log("    " + m.strip()), name=name,
                                    command=f"{command or 'bayescl tune'} (candidate {name}, validation only)")
            except (ValueError, RuntimeError, ArithmeticError) as exc:  # a diverging candidate must not end the grid
                res = _failed_candidate(path, bc, exc)
        if res.get("failed"):
            scores[name], learned[name] = float("nan"), float("nan")
            candidates.append({"name": name, "strategy": strategy, "overrides": spec, "val_score": None,
                               "failed": res["failed"], "json": str(path)})
            log(f"[{k}/{len(runs)}] {name} ({what}): FAILED, not a candidate: {res['failed']}"
                f"{' (failed earlier, kept: --resume)' if kept else ''}")
            continue
        per_seed = [r[METRIC] for r in res["per_seed"]]
        learned[name] = learned_min(res["val_accuracy_matrix"])
        scores[name] = res[METRIC]["mean"]
        candidates.append({"name": name, "strategy": strategy, "overrides": spec, "val_score": scores[name],
                           "val_score_std": res[METRIC]["std"], "val_scores": per_seed,
                           "val_learned_min": learned[name],
                           "val_accuracy_matrix": res["val_accuracy_matrix"], "seeds": res["seeds"],
                           "wall_seconds": res["wall_seconds"]["mean"], "json": str(path)})
        log(f"[{k}/{len(runs)}] {name} ({what}): validation accuracy {100 * scores[name]:.2f} on tasks "
            f"1-{cfg.tune_tasks} (each learned to >= {100 * learned[name]:.1f}), {len(seeds)} seed(s), "
            f"{res['wall_seconds']['mean']:.1f} s/seed"
            f"{' (finished earlier, kept: --resume)' if kept else ''}")
    if all(c.get("failed") for c in candidates):
        raise RuntimeError(f"every candidate of the grid failed; the first: {candidates[0]['failed']}")
    best, eligible = choose_learned(scores, learned, cfg.min_learned, log)
    whole = _tunes_whole_stream(cfg)
    stream = f"all {cfg.tune_tasks} tasks" if whole else f"the first {cfg.tune_tasks} tasks only"
    rule = "" if cfg.min_learned is None else (
        f" among those that learned every task to at least {100 * cfg.min_learned:g} % validation accuracy right "
        "after training it")
    protocol = {
        "name": PROTOCOL_ALL if whole else PROTOCOL,
        "text": (f"Each task's training data split {100 * (1 - cfg.run.val_fraction):g}/{100 * cfg.run.val_fraction:g}"
                 f" into train/validation (seeded by the run's seed). Every candidate trained on {stream} "
                 f"({cfg.epochs} epoch(s)/task, seed(s) {seeds}) and scored by its "
                 f"average validation accuracy over them after the last one; no test data read. The best "
                 f"(first on ties){rule} was then run over the whole stream for {cfg.run.seeds} seed(s) and "
                 "tested."),
        "val_fraction": cfg.run.val_fraction, "tune_tasks": cfg.tune_tasks, "tune_seeds": seeds,
        "tune_epochs": cfg.epochs, "metric": METRIC, "selection": "argmax (first in grid order on ties)",
        "min_learned": cfg.min_learned,
        "no_candidate_eligible": eligible is not None and not eligible,
        "test_data_read_while_tuning": False,
    }
    source = cfg.grid_file or " ".join(f"--grid {k}={','.join(map(str, v))}" for k, v in cfg.grid.items())
    grid = {"source": source, "file": str(grid_path), "base": doc.get("base"), "params": cfg.grid or None,
            "variants": doc["variants"]}
    chosen = next(c for c in candidates if c["name"] == best)
    return {"protocol": protocol, "grid": grid, "candidates": candidates,
            "choice": {k: chosen[k] for k in ("name", "strategy", "overrides", "val_score")}}


def _tunes_whole_stream(cfg: TuneConfig) -> bool:
    """Whether the tuning stream is the whole stream (then the protocol is not "first tasks" but "all tasks")."""
    return cfg.tune_tasks == (cfg.run.num_tasks or _stream_length(cfg.run.scenario))


def _changes(spec: dict[str, Any]) -> str:
    """``k=v, ...``: what a variant sets on its base (its ``module`` arguments, its ``init_args``, the run's ``lr``)."""
    changed = {**(spec.get("module") or {}), **(spec.get("init_args") or {}),
               **({LR: spec[LR]} if LR in spec else {})}
    return ", ".join(f"{k}={v}" for k, v in changed.items())


def run_tune(cfg: TuneConfig, out_dir: str | Path = "benchmarks/results/tuned", log=print,
             command: str | None = None) -> dict[str, Any]:
    """The whole protocol: :func:`tune_candidates`, then the chosen candidate over the whole stream.

    Returns:
        The final result (``bayescl bench``'s schema plus the ``tune`` entry), written to
        ``<out_dir>/<scenario>/<name>.json`` after every finished seed.
    """
    cfg.validate()
    tune = tune_candidates(cfg, out_dir, log=log, command=command)
    overrides = tune["choice"]["overrides"]
    final = dataclasses.replace(cfg.run, strategy=tune["choice"]["strategy"], evaluate_test=True,
                                lr=overrides.get(LR, cfg.run.lr))
    what = _changes(overrides) or tune["choice"]["name"]
    base = overrides.get("base") or tune["grid"]["base"]
    protocol = tune["protocol"]["name"]
    description = f"{base} with {what}, chosen on validation accuracy ({protocol}, {cfg.tune_tasks} tasks)."
    log(f"final run: {tune['choice']['name']} over the whole stream, {cfg.run.seeds} seed(s), tested")
    if final.resume and _stale_final(final, Path(out_dir), _name(cfg)):
        log("  the final run on disk is of another choice (the grid grew or changed): it starts again")
        final = dataclasses.replace(final, resume=False)
    return run_benchmark(final, out_dir=out_dir, log=log, command=command, name=_name(cfg),
                         header={"description": description, "tune": tune})


def _stale_final(final: BenchConfig, out_dir: Path, name: str) -> bool:
    """Whether a final result or part-way final seed on disk was run with another configuration than ``final``
    (with ``--resume`` it would be refused; a changed choice replaces it instead)."""
    folder = out_dir / final.scenario.replace(":", "-")
    states = [folder / f"{name}.json", *sorted((folder / "_resume" / name).glob("seed-*/progress.json"))]
    want = _run_config(final)
    return any(p.is_file() and json.loads(p.read_text()).get("config") != want for p in states)
