"""``bayescl tune``: the choice is the argmax of validation scores, tuning never reads test data, the JSON says how
the recipe was chosen, a stopped tuning resumes, bad input is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bayescl.harness import bench, tune
from bayescl.harness.bench import BenchConfig
from bayescl.harness.cli import main
from bayescl.harness.report import load_results, markdown_table
from bayescl.harness.tune import TuneConfig, parse_grid, run_tune, tune_candidates
from bayescl.harness.tune_choice import choose


def _cfg(**kw) -> TuneConfig:
    run = {"scenario": "synthetic", "strategy": "laplace-diag", "epochs": 1, "uncertainty": False,
           **kw.pop("run", {})}
    return TuneConfig(run=BenchConfig(**run), **{"grid": {"lam": [1, 1000]}, "tune_tasks": 2, **kw})


def _quiet(*_):
    return None


# --------------------------------------------------------------------------------------------------- the choice
def test_choose_is_the_argmax_first_on_ties_and_never_nan():
    assert choose({"a": 0.5, "b": 0.9, "c": 0.7}) == "b"
    assert choose({"a": 0.8, "b": 0.9, "c": 0.9}) == "b"
    assert choose({"a": float("nan"), "b": 0.1}) == "b"
    with pytest.raises(ValueError, match="scores is empty"):
        choose({})


def test_the_final_run_uses_the_candidate_with_the_best_validation_score(monkeypatch, tmp_path):
    """With the training replaced by given validation scores, the choice and the final run follow them."""
    scores = {"laplace-diag-lam1": 0.70, "laplace-diag-lam10": 0.93, "laplace-diag-lam100": 0.93,
              "laplace-diag-lam1000": 0.80}
    finals: list[BenchConfig] = []

    def fake_run_benchmark(cfg, out_dir=None, log=print, command=None, *, name=None, header=None):
        variant = cfg.strategy.rpartition("#")[2]
        if not cfg.evaluate_test:
            s = scores[variant]
            assert cfg.num_tasks == 2 and cfg.epochs == 1 and not cfg.uncertainty
            return {"per_seed": [{"val_avg_accuracy": s}], "val_avg_accuracy": {"mean": s, "std": 0.0},
                    "val_accuracy_matrix": [[[s, 0.5], [s, s]]], "seeds": [0], "wall_seconds": {"mean": 0.0}}
        finals.append(cfg)
        return {"strategy": name, **(header or {})}

    monkeypatch.setattr(tune, "run_benchmark", fake_run_benchmark)
    res = run_tune(_cfg(grid={"lam": [1, 10, 100, 1000]}), out_dir=tmp_path, log=_quiet)
    got = {c["name"]: c["val_score"] for c in res["tune"]["candidates"]}
    assert got == scores
    assert res["tune"]["choice"]["name"] == "laplace-diag-lam10"  # 0.93, first of the tie
    assert res["tune"]["choice"]["overrides"] == {"init_args": {"lam": 10}}
    (final,) = finals
    assert final.strategy.endswith("grid.yaml#laplace-diag-lam10") and final.evaluate_test
    assert final.num_tasks is None and final.seeds == 1  # the whole stream, the final run's seeds
    assert res["strategy"] == "laplace-diag" and "lam=10, chosen on validation accuracy" in res["description"]


def test_grid_lr_tries_every_variant_at_every_learning_rate_and_the_final_run_uses_the_chosen_one(
        monkeypatch, tmp_path):
    """``lr`` is the run's learning rate, not a callback argument: each candidate trains at its own, the final run
    at the chosen one."""
    scores = {("laplace-diag-lam1", 1e-3): 0.70, ("laplace-diag-lam1", 1e-4): 0.75,
              ("laplace-diag-lam10", 1e-3): 0.74, ("laplace-diag-lam10", 1e-4): 0.90}
    seen, finals = [], []

    def fake_run_benchmark(cfg, out_dir=None, log=print, command=None, *, name=None, header=None):
        variant = cfg.strategy.rpartition("#")[2]
        if not cfg.evaluate_test:
            seen.append((variant, cfg.lr, name))
            s = scores[variant, cfg.lr]
            return {"per_seed": [{"val_avg_accuracy": s}], "val_avg_accuracy": {"mean": s, "std": 0.0},
                    "val_accuracy_matrix": [[[s, 0.5], [s, s]]], "seeds": [0], "wall_seconds": {"mean": 0.0}}
        finals.append(cfg)
        return {"strategy": name, **(header or {})}

    monkeypatch.setattr(tune, "run_benchmark", fake_run_benchmark)
    res = run_tune(_cfg(grid={"lam": [1, 10], "lr": [0.001, 0.0001]}), out_dir=tmp_path, log=_quiet)
    assert [(v, lr) for v, lr, _ in seen] == list(scores)  # the callback's grid only makes variants
    assert len({n for *_, n in seen}) == 4  # each candidate its own file
    choice = res["tune"]["choice"]
    assert choice["overrides"] == {"init_args": {"lam": 10}, "lr": 0.0001} and choice["val_score"] == 0.90
    (final,) = finals
    assert final.lr == 0.0001 and final.strategy.endswith("#laplace-diag-lam10")
    assert "lam=10, lr=0.0001, chosen on validation accuracy" in res["description"]
    assert res["tune"]["grid"]["params"] == {"lam": [1, 10], "lr": [0.001, 0.0001]}


def _fake_with_diagonals(scores, diagonals, finals):
    """A run_benchmark whose tuning runs return the given score and the given just-trained accuracies."""
    def fake(cfg, out_dir=None, log=print, command=None, *, name=None, header=None):
        variant = cfg.strategy.rpartition("#")[2]
        if not cfg.evaluate_test:
            s, (d1, d2) = scores[variant], diagonals[variant]
            return {"per_seed": [{"val_avg_accuracy": s}], "val_avg_accuracy": {"mean": s, "std": 0.0},
                    "val_accuracy_matrix": [[[d1, 0.5], [s, d2]]], "seeds": [0], "wall_seconds": {"mean": 0.0}}
        finals.append(cfg)
        return {"strategy": name, **(header or {})}
    return fake


def test_min_learned_skips_candidates_that_hold_old_tasks_by_not_learning_new_ones(monkeypatch, tmp_path):
    """The best average can come from not learning the last task; ``min_learned`` makes that ineligible, says which
    candidates it skipped, and records every candidate's just-trained minimum."""
    scores = {"laplace-diag-lam1": 0.70, "laplace-diag-lam10": 0.80, "laplace-diag-lam100": 0.90}
    diagonals = {"laplace-diag-lam1": (0.99, 0.98), "laplace-diag-lam10": (0.99, 0.96),
                 "laplace-diag-lam100": (0.99, 0.44)}
    finals: list[BenchConfig] = []
    monkeypatch.setattr(tune, "run_benchmark", _fake_with_diagonals(scores, diagonals, finals))
    grid = {"lam": [1, 10, 100]}
    warned: list[str] = []
    plain = run_tune(_cfg(grid=grid), out_dir=tmp_path / "plain", log=warned.append)
    assert plain["tune"]["choice"]["name"] == "laplace-diag-lam100" and plain["tune"]["protocol"]["min_learned"] is None
    assert any("warning: the choice learns some task to only 44.0 %" in line for line in warned)  # not silent
    lines: list[str] = []
    res = run_tune(_cfg(grid=grid, min_learned=0.95), out_dir=tmp_path / "learned", log=lines.append)
    t = res["tune"]
    assert t["choice"]["name"] == "laplace-diag-lam10" and finals[-1].strategy.endswith("#laplace-diag-lam10")
    assert [c["val_learned_min"] for c in t["candidates"]] == [0.98, 0.96, 0.44]
    assert t["protocol"]["min_learned"] == 0.95 and "at least 95 % validation accuracy" in t["protocol"]["text"]
    assert any("scored higher but left a task below min_learned: laplace-diag-lam100" in line for line in lines)
    assert any("each learned to >= 44.0" in line for line in lines)


def test_min_learned_with_no_eligible_candidate_chooses_among_all_and_says_so(monkeypatch, tmp_path):
    scores = {"laplace-diag-lam1": 0.70, "laplace-diag-lam10": 0.80}
    diagonals = {"laplace-diag-lam1": (0.9, 0.5), "laplace-diag-lam10": (0.9, 0.6)}
    monkeypatch.setattr(tune, "run_benchmark", _fake_with_diagonals(scores, diagonals, []))
    lines: list[str] = []
    res = run_tune(_cfg(grid={"lam": [1, 10]}, min_learned=0.99), out_dir=tmp_path, log=lines.append)
    assert res["tune"]["choice"]["name"] == "laplace-diag-lam10"
    assert res["tune"]["protocol"]["no_candidate_eligible"] is True
    assert any("warning: no candidate learned every task to 99 %" in line for line in lines)


def test_a_diverging_candidate_is_recorded_as_failed_and_the_grid_goes_on(monkeypatch, tmp_path):
    """A candidate whose training raises (a NaN refused by the callback) scores nothing; the others are scored and
    chosen from; a resumed tuning does not train the failed one again; a grid of failures is an error."""
    scores = {"laplace-diag-lam1": 0.7, "laplace-diag-lam10": 0.8}
    ran: list[str] = []

    def fake(cfg, out_dir=None, log=print, command=None, *, name=None, header=None):
        ran.append(name)
        if name == "laplace-diag-lam10" or cfg.lr == 0.5:
            raise ValueError("parameter 'model.trunk.1.weight' is not finite (NaN/inf) after training")
        s = scores[name]
        return {"per_seed": [{"val_avg_accuracy": s}], "val_avg_accuracy": {"mean": s, "std": 0.0},
                "val_accuracy_matrix": [[[s, 0.5], [s, s]]], "seeds": [0], "wall_seconds": {"mean": 0.0}}

    monkeypatch.setattr(tune, "run_benchmark", fake)
    lines: list[str] = []
    res = tune_candidates(_cfg(grid={"lam": [1, 10]}), tmp_path, log=lines.append)
    assert res["choice"]["name"] == "laplace-diag-lam1"
    failed = res["candidates"][1]
    assert failed["val_score"] is None and "not finite" in failed["failed"]
    assert any("laplace-diag-lam10" in line and "FAILED" in line for line in lines)
    ran.clear()
    again = tune_candidates(_cfg(grid={"lam": [1, 10]}, run={"resume": True}), tmp_path, log=_quiet)
    assert "laplace-diag-lam10" not in ran and again["choice"]["name"] == "laplace-diag-lam1"  # failed: kept
    with pytest.raises(RuntimeError, match="every candidate of the grid failed; the first: ValueError"):
        tune_candidates(_cfg(grid={"lam": [1, 10]}, run={"lr": 0.5}), tmp_path / "all", log=_quiet)


# --------------------------------------------------------------------------------------------------- no test data
class Poisoned(Exception):
    pass


class _Poison:
    """A test set that refuses to be read."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        raise Poisoned("the test set was read")

    def __getitem__(self, i):
        raise Poisoned("the test set was read")


class _Counted:
    def __init__(self, ds, reads):
        self.ds, self.reads = ds, reads

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.ds[i]


def test_tuning_never_reads_the_test_data(monkeypatch, tmp_path):
    """Every stream's test sets raise when read: tuning succeeds (and reads the validation sets); the final run,
    which tests, hits the poison."""
    real_stream, val_reads = bench._stream, []

    def poisoned_stream(cfg, seed):
        stream = real_stream(cfg, seed)
        for task in stream:
            task.test = _Poison(task.test)
            task.val = _Counted(task.val, val_reads)
        return stream

    monkeypatch.setattr(bench, "_stream", poisoned_stream)
    res = tune_candidates(_cfg(), tmp_path, log=_quiet)
    assert len(res["candidates"]) == 2 and val_reads  # validation data was evaluated, test data never
    assert res["protocol"]["test_data_read_while_tuning"] is False
    with pytest.raises(Poisoned):
        run_tune(_cfg(), out_dir=tmp_path / "final", log=_quiet)


# --------------------------------------------------------------------------------------------------- the JSON
def test_tune_json_records_protocol_grid_scores_choice_and_report_reads_it(tmp_path):
    lines: list[str] = []
    res = run_tune(_cfg(run={"num_tasks": 3}), out_dir=tmp_path, log=lines.append, command="bayescl tune test")
    doc = json.loads((tmp_path / "synthetic" / "laplace-diag.json").read_text())
    t = doc["tune"]
    p = t["protocol"]
    assert (p["val_fraction"], p["tune_tasks"], p["tune_seeds"], p["tune_epochs"], p["metric"]) == \
        (0.1, 2, [0], 1, "val_avg_accuracy")
    assert "Chaudhry" in p["name"] and "no test data read" in p["text"]
    assert t["grid"]["params"] == {"lam": [1, 1000]} and t["grid"]["source"] == "--grid lam=1,1000"
    assert [c["name"] for c in t["candidates"]] == ["laplace-diag-lam1", "laplace-diag-lam1000"]
    for c in t["candidates"]:
        V = c["val_accuracy_matrix"][0]
        assert len(V) == 2 and c["val_score"] == pytest.approx((V[1][0] + V[1][1]) / 2)  # tasks 1-2, after task 2
        assert Path(c["json"]).is_file()
    best = max(t["candidates"], key=lambda c: c["val_score"])  # first of equal maxima, as choose()
    assert t["choice"]["name"] == best["name"] and t["choice"]["val_score"] == best["val_score"]
    assert doc["config"]["strategy"].endswith(f"#{best['name']}") and doc["config"]["val_fraction"] == 0.1
    assert len(doc["accuracy_matrix"][0]) == 3 and len(doc["val_accuracy_matrix"][0]) == 3  # the whole stream
    assert res["avg_accuracy"] == doc["avg_accuracy"]
    assert sum(line.startswith("[") for line in lines) == 2  # one progress line per candidate
    (loaded,) = load_results(tmp_path / "synthetic")  # bayescl report reads it; the candidates are not results
    assert loaded["strategy"] == "laplace-diag" and "| laplace-diag |" in markdown_table([loaded])
    assert load_results(Path(t["candidates"][0]["json"]).parent) == []


def test_protocol_says_all_tasks_when_tuning_covers_the_whole_stream(tmp_path):
    """Tuning on every task of the stream is not "first tasks" validation; the JSON and description say which."""
    res = run_tune(_cfg(run={"num_tasks": 2}), out_dir=tmp_path, log=_quiet)
    p = res["tune"]["protocol"]
    assert p["name"] == "all-tasks validation" and "trained on all 2 tasks (" in p["text"]
    assert "all-tasks validation, 2 tasks" in res["description"]
    first = tune_candidates(_cfg(run={"num_tasks": 3}), tmp_path / "first", log=_quiet)["protocol"]
    assert "Chaudhry" in first["name"] and "the first 2 tasks only" in first["text"]


# --------------------------------------------------------------------------------------------------- resume
def test_resume_skips_the_candidates_already_on_disk(monkeypatch, tmp_path):
    class Killed(Exception):
        pass

    def killed_after_first(line):
        if line.startswith("[1/2]"):
            raise Killed

    with pytest.raises(Killed):
        tune_candidates(_cfg(), tmp_path, log=killed_after_first)
    first = json.loads((tmp_path / "_tune" / "laplace-diag" / "synthetic" / "laplace-diag-lam1.json").read_text())
    ran: list[str] = []
    real = tune.run_benchmark

    def counting(cfg, *a, **kw):
        ran.append(cfg.strategy.rpartition("#")[2])
        return real(cfg, *a, **kw)

    monkeypatch.setattr(tune, "run_benchmark", counting)
    lines: list[str] = []
    res = tune_candidates(_cfg(run={"resume": True}), tmp_path, log=lines.append)
    assert ran == ["laplace-diag-lam1000"]  # the finished candidate is kept
    assert any(line.startswith("[1/2] laplace-diag-lam1 ") and "kept" in line for line in lines)
    assert res["candidates"][0]["val_accuracy_matrix"] == first["val_accuracy_matrix"]
    ran.clear()
    tune_candidates(_cfg(), tmp_path, log=_quiet)  # without resume every candidate runs again
    assert ran == ["laplace-diag-lam1", "laplace-diag-lam1000"]


def test_resume_after_the_grid_grew_replaces_a_final_run_of_another_choice(monkeypatch, tmp_path):
    """A grid extended under ``--resume`` keeps its finished candidates; when the choice moves, the old final run
    (and a part-way final seed) is replaced instead of refused."""
    scores = {"laplace-diag-lam1": 0.7, "laplace-diag-lam10": 0.8, "laplace-diag-lam100": 0.9}
    real = tune.run_benchmark

    def scored(cfg, *a, **kw):
        if cfg.evaluate_test:
            return real(cfg, *a, **kw)
        s = scores[cfg.strategy.rpartition("#")[2]]
        return {"per_seed": [{"val_avg_accuracy": s}], "val_avg_accuracy": {"mean": s, "std": 0.0},
                "val_accuracy_matrix": [[[s]]], "seeds": [0], "wall_seconds": {"mean": 0.0}}

    monkeypatch.setattr(tune, "run_benchmark", scored)
    first = run_tune(_cfg(grid={"lam": [1, 10]}, run={"num_tasks": 2}), out_dir=tmp_path, log=_quiet)
    assert first["config"]["strategy"].endswith("#laplace-diag-lam10")
    stale = tmp_path / "synthetic" / "_resume" / "laplace-diag" / "seed-0" / "progress.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"config": {"strategy": "an older choice"}}))
    lines: list[str] = []
    grown = run_tune(_cfg(grid={"lam": [1, 10, 100]}, run={"num_tasks": 2, "resume": True}), out_dir=tmp_path,
                     log=lines.append)
    assert grown["config"]["strategy"].endswith("#laplace-diag-lam100") and len(grown["per_seed"]) == 1
    assert any("of another choice" in line for line in lines) and not stale.exists()
    doc = json.loads((tmp_path / "synthetic" / "laplace-diag.json").read_text())
    assert doc["config"] == grown["config"]
    again: list[str] = []  # the same grid again (a new rule that keeps the choice): the final run is kept ...
    run_tune(_cfg(grid={"lam": [1, 10, 100]}, run={"num_tasks": 2, "resume": True}, min_learned=0.5),
             out_dir=tmp_path, log=again.append)
    assert not any("of another choice" in line for line in again) and any("kept" in line for line in again)
    kept = json.loads((tmp_path / "synthetic" / "laplace-diag.json").read_text())
    assert kept["per_seed"] == doc["per_seed"]
    assert kept["tune"]["protocol"]["min_learned"] == 0.5  # ... and the JSON says how it was chosen this time


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "nope", "--grid", "lam=1,10"], "strategy='nope' is not a known recipe"),
        (["--strategy", "laplace-diag"], "the grid is empty"),
        (["--strategy", "laplace-diag", "--grid", "lam="], "has no values"),
        (["--strategy", "laplace-diag", "--grid", "lam"], "is not of the form KEY=v1,v2,..."),
        (["--strategy", "laplace-diag", "--grid", "lam=1,1.0"], "holds a value twice"),
        (["--strategy", "laplace-diag", "--grid", "lam=1", "--grid", "lam=2"], "is given twice"),
        (["--strategy", "laplace-diag", "--grid", "lam=1,10", "--tune-tasks", "4"],
         "tune_tasks=4 is more than the stream's 3 tasks"),
        (["--strategy", "laplace-diag", "--grid", "lam=1,10", "--num-tasks", "2", "--tune-tasks", "3"],
         "tune_tasks=3 is more than the stream's 2 tasks"),
        (["--strategy", "laplace-diag", "--grid", "lam=1,10", "--tune-tasks", "0"], "tune_tasks=0"),
        (["--strategy", "laplace-diag", "--grid", "lam=1,10", "--val-fraction", "0"], "val_fraction=0 holds out no"),
        (["--strategy", "laplace-diag", "--grid", "lam=1,10", "--val-fraction", "1.5"], "val_fraction=1.5"),
        (["--strategy", "laplace-diag", "--grid", "lamm=1,10"], "does not take these arguments"),
        (["--strategy", "laplace-diag", "--grid", "lam=-1,10"], "lam=-1"),
        (["--strategy", "naive", "--grid", "lam=1,10"], "has no callback"),
        (["--strategy", "avalanche-ewc", "--grid", "lam=1,10"], "has no callback"),
        (["--grid-file", "benchmarks/grids/lambda.yaml", "--strategy", "laplace-diag"], "give one or the other"),
        (["--grid-file", "no/such/grid.yaml"], "no/such/grid.yaml"),
        (["--strategy", "laplace-diag", "--grid", "lam=1", "--name", "a/b"], "name='a/b' is not valid"),
        (["--strategy", "laplace-diag", "--grid", "lr=0,0.001"], "grid lr=0 is not a learning rate"),
        (["--strategy", "laplace-diag", "--grid", "lam=1,10", "--min-learned", "0"], "min_learned=0.0 is not valid"),
        (["--strategy", "laplace-diag", "--grid", "lam=1,10", "--min-learned", "95"], "min_learned=95.0 is not valid"),
        (["--strategy", "laplace-diag", "--grid", "lr=fast"], "grid lr='fast' is not a learning rate"),
        (["--grid-file", "benchmarks/grids/lambda.yaml", "--grid", "lam=1,10"], "not both"),
    ],
)
def test_cli_tune_refuses_bad_input_before_any_work(args, message, capsys, tmp_path):
    assert main(["tune", "--scenario", "synthetic", *args, "--epochs", "1", "--out", str(tmp_path),
                 "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not list(Path(tmp_path).rglob("*"))  # nothing written


def test_parse_grid_reads_yaml_scalars():
    assert parse_grid(["lam=1,10,1e3", "online=true,false", "structure=kron"]) == \
        {"lam": [1, 10, 1000.0], "online": [True, False], "structure": ["kron"]}


def test_cli_tune_with_a_grid_file(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text("base: laplace-diag\nvariants:\n  d1:\n    init_args: {lam: 1}\n    module: {optimizer: sgd}\n"
                    "  d3:\n    init_args: {lam: 3}\n    module: {optimizer: sgd}\n")
    out = tmp_path / "out"
    rc = main(["tune", "--scenario", "synthetic", "--grid-file", str(grid), "--tune-tasks", "1", "--num-tasks", "2",
               "--epochs", "1", "--out", str(out), "--no-progress", "--no-uncertainty", "--no-report"])
    assert rc == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "synthetic" / "g.json").read_text())
    assert [c["name"] for c in doc["tune"]["candidates"]] == ["d1", "d3"]
    assert doc["tune"]["grid"]["file"] == str(grid) and doc["tune"]["grid"]["params"] is None
    assert f"| {doc['tune']['choice']['name']} (chosen) |" in printed and "| g |" in printed
    assert "laplace-diag with optimizer=sgd, lam=" in doc["description"]  # a variant's module is part of the choice


def test_cli_tune_no_final_scores_the_candidates_and_reads_no_test_data(tmp_path, capsys, monkeypatch):
    """``--no-final``: every candidate is scored and the choice printed; no final result is written and no test
    loader is built (the run that would read test data never starts); ``--resume`` then runs the final alone."""
    configs = []
    real = bench.run_benchmark

    def spy(cfg, *a, **k):
        configs.append(cfg.evaluate_test)
        return real(cfg, *a, **k)

    monkeypatch.setattr("bayescl.harness.tune.run_benchmark", spy)
    args = ["tune", "--scenario", "synthetic", "--strategy", "laplace-diag", "--grid", "lam=1,3", "--tune-tasks",
            "1", "--num-tasks", "2", "--epochs", "1", "--out", str(tmp_path), "--no-progress", "--no-uncertainty",
            "--no-report"]
    assert main([*args, "--no-final"]) == 0
    printed = capsys.readouterr().out
    assert configs == [False, False] and "(chosen)" in printed and "--no-final" in printed
    assert not (tmp_path / "synthetic" / "laplace-diag.json").exists()
    assert len(list((tmp_path / "_tune" / "laplace-diag" / "synthetic").glob("laplace-diag-lam*.json"))) == 2
    assert main([*args, "--resume"]) == 0  # the candidates are kept; only the final run trains
    assert configs == [False, False, True] and (tmp_path / "synthetic" / "laplace-diag.json").exists()


def test_cli_tune_lr_beside_a_grid_file_and_alone(tmp_path, capsys):
    """``--grid lr=...`` multiplies a grid file's variants; alone it tunes the base recipe's learning rate only."""
    grid = tmp_path / "g.yaml"
    grid.write_text("base: laplace-diag\nvariants:\n  d1:\n    init_args: {lam: 1}\n")
    common = ["--scenario", "synthetic", "--tune-tasks", "1", "--num-tasks", "2", "--epochs", "1", "--no-progress",
              "--no-uncertainty", "--no-report"]
    assert main(["tune", "--grid-file", str(grid), "--grid", "lr=0.01,0.001", "--out", str(tmp_path / "a"),
                 *common]) == 0
    doc = json.loads((tmp_path / "a" / "synthetic" / "g.json").read_text())
    assert [c["name"] for c in doc["tune"]["candidates"]] == ["d1-lr0.01", "d1-lr0.001"]
    assert doc["config"]["lr"] == doc["tune"]["choice"]["overrides"]["lr"]  # the final run's learning rate
    assert main(["tune", "--strategy", "naive", "--grid", "lr=0.01,0.001", "--out", str(tmp_path / "b"),
                 *common]) == 0  # a recipe without a callback: its learning rate alone is tuned
    doc = json.loads((tmp_path / "b" / "synthetic" / "naive.json").read_text())
    assert [c["name"] for c in doc["tune"]["candidates"]] == ["naive-lr0.01", "naive-lr0.001"]
    assert main(["tune", "--strategy", "laplace-diag", "--grid", "lr=0.01,0.001", "--out", str(tmp_path / "c"),
                 *common]) == 0
    doc = json.loads((tmp_path / "c" / "synthetic" / "laplace-diag.json").read_text())
    assert [c["name"] for c in doc["tune"]["candidates"]] == ["laplace-diag-lr0.01", "laplace-diag-lr0.001"]
    capsys.readouterr()
