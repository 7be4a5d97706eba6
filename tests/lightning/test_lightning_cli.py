"""One task per run: LightningCLI processes, one per task, each resuming the previous run's last checkpoint, carry
the posterior from task to task, with the project's recipes as the callbacks of the CLI config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("jsonargparse")

ROOT = Path(__file__).resolve().parents[2]
TASKS, EPOCHS, BATCH = 3, 1, 32
MODEL = {"class_path": "bayescl.MultiHeadMLP",
         "init_args": {"hidden": [16], "num_tasks": TASKS, "classes_per_task": 2}}


def _config(recipe: str, ckpt_dir: Path) -> dict:
    callbacks = yaml.safe_load((ROOT / "strategies" / f"{recipe}.yaml").read_text())["callbacks"]
    checkpoint = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(ckpt_dir), "save_last": True}}
    return {
        "seed_everything": 0,
        "trainer": {"max_epochs": EPOCHS, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "callbacks": [*callbacks, checkpoint]},
        "model": {"model": MODEL, "num_tasks": TASKS},
        "data": {"scenario": "synthetic", "batch_size": BATCH},
    }


def _run_task(config: Path, task: int, ckpt: Path | None) -> None:
    cmd = [sys.executable, "-m", "bayescl.harness.lightning_cli", "fit", "--config", str(config),
           "--data.task", str(task)]
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _in_process(recipe: str) -> dict:
    """The same three tasks in one process: a new Trainer per task, the same seed and callbacks."""
    import pytorch_lightning as pl

    from bayescl.harness.datamodule import TaskDataModule
    from bayescl.harness.models import MultiHeadMLP
    from bayescl.harness.module import ClassifierModule
    from bayescl.harness.recipes import load_recipe

    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(MultiHeadMLP(**MODEL["init_args"]), num_tasks=TASKS)
    (cb,) = load_recipe(recipe).build_callbacks()
    for t in range(TASKS):
        pl.seed_everything(0, verbose=False)  # LightningCLI seeds every run
        trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, callbacks=[cb])
        trainer.fit(module, datamodule=TaskDataModule("synthetic", task=t, batch_size=BATCH))
    return cb.server.state_dict()


@pytest.mark.parametrize("recipe", ["laplace-diag", "laplace-kron"])
def test_one_task_per_run_carries_the_posterior(tmp_path, recipe, assert_states_close):
    ckpt_dir = tmp_path / "ckpts"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(recipe, ckpt_dir)))
    last = ckpt_dir / "last.ckpt"
    for t in range(TASKS):
        _run_task(config, t, last if t > 0 else None)
        saved = torch.load(last, map_location="cpu", weights_only=False)
        (state,) = [v for v in saved["callbacks"].values() if "tasks_seen" in v]
        assert state["tasks_seen"] == t + 1 and not state["task_open"]  # the task's site is in its last checkpoint
    (server,) = [v for k, v in saved.items() if k.startswith("bayescl-laplace/")]
    expected = _in_process(recipe)
    online = recipe == "laplace-kron"
    assert list(server["sites"]) == list(expected["sites"]) == (["online"] if online else
                                                                 [f"task-{t}" for t in range(TASKS)])
    assert_states_close(server, expected, 1e-5, "server")


