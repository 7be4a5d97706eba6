import json
from pathlib import Path

import pytest

from bayescl.harness.bench import BenchConfig, run_benchmark
from bayescl.harness.cli import main
from bayescl.harness.recipes import available_recipes, grid_variants, load_recipe
from bayescl.harness.report import write_report

REQUIRED = {"scenario", "strategy", "command", "seeds", "accuracy_matrix", "avg_accuracy", "bwt", "wall_seconds",
            "peak_rss_mb"}


def test_runner_end_to_end_on_synthetic_stream(tmp_path):
    cfg = BenchConfig(scenario="synthetic", strategy="naive", seeds=2, epochs=1, num_tasks=3)
    res = run_benchmark(cfg, out_dir=tmp_path, log=lambda *_: None, command="test")
    doc = json.loads((tmp_path / "synthetic" / "naive.json").read_text())
    assert REQUIRED <= set(doc)
    assert doc["seeds"] == [0, 1] and len(doc["accuracy_matrix"]) == 2
    R = doc["accuracy_matrix"][0]
    assert len(R) == 3 and all(len(row) == 3 for row in R)
    # every stage tested every task; the synthetic tasks are easy, so the diagonal is learnt
    assert all(R[i][i] > 0.9 for i in range(3))
    assert 0.0 <= doc["avg_accuracy"]["mean"] <= 1.0 and doc["avg_accuracy"]["std"] >= 0.0
    assert res["avg_accuracy"] == doc["avg_accuracy"]
    written = write_report(tmp_path)
    names = {p.name for p in written}
    assert {"README.md", "accuracy_matrix.png", "accuracy_over_time.png"} <= names
    assert (tmp_path / "synthetic" / "accuracy_matrix.png").stat().st_size > 1000
    assert "| naive |" in (tmp_path / "synthetic" / "README.md").read_text()


def test_joint_recipe_trains_on_all_seen_tasks(tmp_path):
    cfg = BenchConfig(scenario="synthetic", strategy="joint", seeds=1, epochs=1, num_tasks=2)
    res = run_benchmark(cfg, out_dir=None, log=lambda *_: None)
    run = res["per_seed"][0]
    # cumulative data: the second fit sees both tasks' batches (4 + 8 steps of batch 64 over 256 / 512 examples)
    assert run["optimizer_steps"] == 4 + 8


def test_recipes_listed_and_unknown_names_rejected():
    assert {"naive", "joint"} <= set(available_recipes())
    assert load_recipe("joint").cumulative and not load_recipe("naive").cumulative
    with pytest.raises(ValueError, match="strategy='nope' is not a known recipe; allowed: .*naive"):
        load_recipe("nope")


def test_bad_recipe_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\ncallbacks:\n  - class_path: bayescl.NoSuchCallback\nfoo: 1\n")
    with pytest.raises(ValueError, match="unknown keys \\['foo'\\]"):
        load_recipe(p)
    p.write_text("name: bad\ncallbacks:\n  - class_path: bayescl.NoSuchCallback\n")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_recipe(p).build_callbacks()


def test_recipe_reads_exponent_floats(tmp_path):
    p = tmp_path / "vcl-lr.yaml"
    p.write_text("name: vcl-lr\ncallbacks:\n  - class_path: bayescl.VCLCallback\n    init_args:\n"
                 "      coreset_lr: 3e-3\n      logvar_init: -1E+1\n      prior_precision: 1.5e0\n"
                 "      seed: 7\n")
    (cb,) = load_recipe(p).build_callbacks()
    assert cb.coreset_lr == 3e-3 and cb.logvar_init == -10.0 and cb.prior_precision == 1.5 and cb.seed == 7


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scenario", "split-cifar", "--strategy", "naive"], "scenario='split-cifar' is not valid; allowed:"),
        (["--scenario", "synthetic", "--strategy", "naive", "--seeds", "0"], "seeds=0"),
        (["--scenario", "synthetic", "--strategy", "naive", "--epochs", "-1"], "epochs=-1"),
        (["--scenario", "synthetic", "--strategy", "zzz"], "not a known recipe"),
    ],
)
def test_cli_refuses_bad_input(args, message, capsys, tmp_path):
    assert main(["bench", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(Path(tmp_path).rglob("*.json"))


def test_cli_bench_prints_table(capsys, tmp_path):
    rc = main(["bench", "--scenario", "synthetic", "--strategy", "naive", "--epochs", "1", "--num-tasks", "2",
               "--out", str(tmp_path), "--no-progress", "--no-report"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| strategy | avg accuracy (%)" in out and "| naive |" in out


def test_grid_variant_overrides_its_base(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: vcl\nvariants:\n  vcl-lv7:\n    init_args: {logvar_init: -7.0, train_samples: 1}\n"
                    "  sweep-naive:\n    base: naive\n    description: plain\n")
    r = load_recipe(f"{grid}#vcl-lv7")
    base = load_recipe("vcl")
    assert r.name == "vcl-lv7" and r.data == base.data and r.description == base.description
    assert r.callbacks[0]["init_args"] == {**base.callbacks[0]["init_args"], "logvar_init": -7.0, "train_samples": 1}
    assert base.callbacks[0]["init_args"]["logvar_init"] == -6.0  # the base recipe is not changed
    (cb,) = r.build_callbacks()
    assert cb.logvar_init == -7.0 and cb.train_samples == 1
    assert load_recipe(f"{grid}#sweep-naive").description == "plain"
    with pytest.raises(ValueError, match="variant='nope' is not in grid .*allowed: vcl-lv7, sweep-naive"):
        load_recipe(f"{grid}#nope")
    grid.write_text("variants:\n  a:\n    init_args: {lam: 2}\n")
    with pytest.raises(ValueError, match="variant 'a' has no 'base' recipe"):
        load_recipe(f"{grid}#a")


@pytest.mark.parametrize("grid", sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "grids").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_committed_grid_variant_builds(grid):
    for name in grid_variants(grid):
        recipe = load_recipe(f"{grid}#{name}")
        assert recipe.name == name and len(recipe.build_callbacks()) == len(recipe.callbacks)


def test_cli_runs_a_grid_variant(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: laplace-diag\nvariants:\n  diag-lam3:\n    init_args: {lam: 3.0}\n")
    rc = main(["bench", "--scenario", "synthetic", "--strategy", f"{grid}#diag-lam3", "--epochs", "1",
               "--num-tasks", "2", "--out", str(tmp_path), "--no-progress", "--no-report", "--no-uncertainty"])
    assert rc == 0 and "| diag-lam3 |" in capsys.readouterr().out
    doc = json.loads((tmp_path / "synthetic" / "diag-lam3.json").read_text())
    assert doc["strategy"] == "diag-lam3" and doc["config"]["strategy"] == f"{grid}#diag-lam3"


def test_cosine_lr_schedule_falls_from_lr_to_zero_within_every_fit():
    """``lr_schedule="cosine"``: each fit (task) starts at ``lr`` and steps a half cosine to 0 over its optimizer
    steps, in a real Trainer reused for two fits; ``"constant"`` keeps ``lr``; a bad value names the allowed ones."""
    import math

    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from bayescl.harness.module import ClassifierModule

    data = DataLoader(TensorDataset(torch.randn(24, 3), torch.randint(0, 2, (24,))), batch_size=4)  # 6 steps/epoch
    seen = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    for schedule, want in [("cosine", [0.1 * (1 + math.cos(math.pi * k / 12)) / 2 for k in range(12)]),
                           ("constant", [0.1] * 12)]:
        seen.clear()
        module = ClassifierModule(torch.nn.Linear(3, 2), 1, lr=0.1, lr_schedule=schedule)
        for _ in range(2):  # a new Trainer per task, as the harness does
            trainer = pl.Trainer(max_epochs=2, callbacks=[Record()], logger=False, enable_progress_bar=False,
                                 enable_checkpointing=False, enable_model_summary=False)
            trainer.fit(module, data)
        assert seen == pytest.approx(want * 2, abs=1e-9), schedule
    with pytest.raises(ValueError, match="lr_schedule='linear' is not valid; allowed: constant, cosine"):
        ClassifierModule(torch.nn.Linear(2, 2), 1, lr_schedule="linear")


def test_grid_variant_sets_the_module_optimizer(tmp_path, capsys):
    """A variant's ``module`` reaches ClassifierModule (SGD with its momentum, the run's lr) and a run trains with
    it; a ``module.lr`` is refused before any recipe of the command runs."""
    import torch

    from bayescl.harness.module import ClassifierModule

    grid = tmp_path / "grid.yaml"
    grid.write_text("base: laplace-diag\nvariants:\n  diag-sgd:\n    module: {optimizer: sgd, momentum: 0.5}\n"
                    "  diag-lr:\n    module: {lr: 0.1}\n")
    r = load_recipe(f"{grid}#diag-sgd")
    assert r.module == {"optimizer": "sgd", "momentum": 0.5} and load_recipe("laplace-diag").module == {}
    opt = ClassifierModule(torch.nn.Linear(2, 2), 1, lr=0.01, **r.module).configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.5 and opt.defaults["lr"] == 0.01
    assert isinstance(ClassifierModule(torch.nn.Linear(2, 2), 1).configure_optimizers(), torch.optim.Adam)
    with pytest.raises(ValueError, match="optimizer='rmsprop' is not valid; allowed: adam, sgd"):
        ClassifierModule(torch.nn.Linear(2, 2), 1, optimizer="rmsprop")
    args = ["bench", "--scenario", "synthetic", "--epochs", "1", "--num-tasks", "2", "--out", str(tmp_path),
            "--no-progress", "--no-report", "--no-uncertainty", "--lr", "0.05"]
    assert main([*args, "--strategy", f"{grid}#diag-sgd"]) == 0
    assert "| diag-sgd |" in capsys.readouterr().out
    (tmp_path / "synthetic" / "diag-sgd.json").unlink()
    assert main([*args, "--strategy", f"{grid}#diag-sgd", f"{grid}#diag-lr"]) != 0  # refused before the first runs
    assert "strategy='diag-lr' sets module.lr=0.1; the learning rate is the run's" in capsys.readouterr().err
    assert not (tmp_path / "synthetic" / "diag-lr.json").exists()
    assert not (tmp_path / "synthetic" / "diag-sgd.json").exists()


def test_resume_continues_a_stopped_seed_to_the_same_result(tmp_path):
    """A seed stopped after its second task and resumed with --resume gives the uninterrupted run's results."""
    import json

    from bayescl.harness.bench import BenchConfig, run_benchmark

    def cfg(**kw):
        return BenchConfig(scenario="synthetic", strategy="laplace-diag", seeds=1, epochs=1, batch_size=64,
                           uncertainty=False, **kw)

    full = run_benchmark(cfg(), out_dir=tmp_path / "full", log=lambda *_: None)

    class Stop(Exception):
        pass

    def stop_after_task_2(msg: str) -> None:
        if "task 2/3" in msg:
            raise Stop

    with pytest.raises(Stop):
        run_benchmark(cfg(), out_dir=tmp_path / "stopped", log=stop_after_task_2)
    state = tmp_path / "stopped" / "synthetic" / "_resume" / "laplace-diag" / "seed-0"
    assert json.loads((state / "progress.json").read_text())["tasks_done"] == 2
    # a part-way seed is not continued under another configuration (here: with the uncertainty records on)
    with pytest.raises(ValueError, match="part-way seed .* another configuration"):
        run_benchmark(BenchConfig(scenario="synthetic", strategy="laplace-diag", seeds=1, epochs=1, batch_size=64,
                                  uncertainty=True, resume=True), out_dir=tmp_path / "stopped", log=lambda *_: None)
    assert json.loads((state / "progress.json").read_text())["tasks_done"] == 2  # and nothing of it was lost
    logs: list[str] = []
    resumed = run_benchmark(cfg(resume=True), out_dir=tmp_path / "stopped", log=logs.append)
    assert any("resuming after task 2/3" in m for m in logs)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert not state.exists()  # the finished seed's progress is gone; its result is in the JSON
    kept = run_benchmark(cfg(resume=True), out_dir=tmp_path / "stopped", log=logs.append)
    assert kept["accuracy_matrix"] == full["accuracy_matrix"] and any("kept (--resume)" in m for m in logs)
    with pytest.raises(ValueError, match="another configuration"):
        run_benchmark(BenchConfig(scenario="synthetic", strategy="laplace-diag", seeds=1, epochs=2, batch_size=64,
                                  uncertainty=False, resume=True), out_dir=tmp_path / "stopped", log=logs.append)


def test_bench_records_a_validation_accuracy_matrix(tmp_path):
    """With val_fraction > 0 every stage is evaluated on every task's validation data too, stored beside the test
    matrix; val_fraction is in the config; val_fraction=0 records none."""
    cfg = BenchConfig(scenario="synthetic", strategy="naive", epochs=1, num_tasks=2, uncertainty=False,
                      val_fraction=0.25)
    run_benchmark(cfg, out_dir=tmp_path, log=lambda *_: None, command="test")
    doc = json.loads((tmp_path / "synthetic" / "naive.json").read_text())
    assert doc["config"]["val_fraction"] == 0.25
    (V,), (R,) = doc["val_accuracy_matrix"], doc["accuracy_matrix"]
    assert len(V) == 2 and all(len(row) == 2 for row in V)
    assert V[0][0] > 0.9 and V[1][1] > 0.9  # the synthetic tasks are learnt; validation sees that as test does
    # 64 validation examples per task: every entry is a multiple of 1/64 (the test set has 128)
    assert all(abs(64 * v - round(64 * v)) < 1e-9 for row in V for v in row)
    assert doc["val_avg_accuracy"]["mean"] == pytest.approx((V[1][0] + V[1][1]) / 2)
    assert R != V
    steps = doc["per_seed"][0]["optimizer_steps"]
    assert steps == 2 * 3  # 192 training examples per task: 3 batches of 64, the held-out 64 are not trained on
    run_benchmark(BenchConfig(scenario="synthetic", strategy="naive", epochs=1, num_tasks=2, uncertainty=False,
                              val_fraction=0.0), out_dir=tmp_path / "none", log=lambda *_: None)
    doc = json.loads((tmp_path / "none" / "synthetic" / "naive.json").read_text())
    assert "val_accuracy_matrix" not in doc and "val_avg_accuracy" not in doc
    assert doc["per_seed"][0]["optimizer_steps"] == 2 * 4


@pytest.mark.parametrize("kw, message", [
    ({"evaluate_test": False, "val_fraction": 0.0}, "evaluate_test=False needs validation data"),
    ({"evaluate_test": False, "uncertainty": True}, "set uncertainty=False"),
    ({"val_fraction": 1.0}, "val_fraction=1.0 is out of range"),
])
def test_bench_config_refuses_validation_settings_that_cannot_work(kw, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(scenario="synthetic", strategy="naive", **kw).validate()
