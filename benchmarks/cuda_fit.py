"""LaplaceCallback (diag, kron) and VCLCallback fitted on one CUDA GPU: does the posterior live where the module does?

Two tiny synthetic tasks, a multi-head MLP, one ``pl.Trainer(accelerator="gpu", devices=1)`` per task. At the end of
each task (after the callback commits its site, before Lightning's teardown moves the module back to the CPU) every
tensor of the callback's server (prior and sites) and of its posterior is checked: on the module's device and finite.
One line per callback; the exit status is 1 when a check fails. Without a GPU it says so and exits 0.

    python benchmarks/cuda_fit.py
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: name -> the callback's constructor arguments (``None``: VCLCallback)
METHODS = {"laplace-diag": {"structure": "diag"}, "laplace-kron": {"structure": "kron"}, "vcl": None}
NUM_TASKS, N_TRAIN, BATCH, HIDDEN = 2, 64, 16, (32,)
ACCELERATOR = "gpu"  #: "cpu" exercises the checks without a GPU (from Python: set it before run())


def tensors(state, path: str = ""):
    """``(path, tensor)`` for every tensor in a nested state (dicts, lists, tuples)."""
    if isinstance(state, torch.Tensor):
        yield path, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from tensors(v, f"{path}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from tensors(v, f"{path}/{i}")


def make_probe(cb, problems: list[str], checked: list[tuple[int, torch.device]]):
    """A callback, placed after ``cb``, that checks ``cb``'s server and posterior at the end of each task."""
    import pytorch_lightning as pl

    class Probe(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            device = next(pl_module.parameters()).device
            state = {"server": cb.server.state_dict(), "posterior": cb.posterior().state_dict()}
            found, task = list(tensors(state)), len(checked)
            checked.append((len(found), device))
            if not found:
                problems.append(f"task {task}: no posterior tensor")
            for path, t in found:
                if t.device != device:
                    problems.append(f"task {task}: {path} on {t.device}, module on {device}")
                elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    problems.append(f"task {task}: {path} not finite")

    return Probe()


def run(name: str, kwargs: dict | None) -> bool:
    """Fit the two tasks with one callback; print its line; whether every check passed."""
    import pytorch_lightning as pl

    from bayescl import ClassifierModule, LaplaceCallback, MultiHeadMLP, VCLCallback, synthetic_stream

    torch.manual_seed(0)
    stream = synthetic_stream(num_tasks=NUM_TASKS, n_train=N_TRAIN, n_test=8, seed=0)
    module = ClassifierModule(MultiHeadMLP(hidden=HIDDEN, num_tasks=NUM_TASKS), num_tasks=NUM_TASKS, lr=1e-2)
    cb = VCLCallback(coreset_size=8, test_samples=1) if kwargs is None else LaplaceCallback(**kwargs)
    problems: list[str] = []
    checked: list[tuple[int, torch.device]] = []
    start = time.perf_counter()
    try:
        for t, task in enumerate(stream):
            data = cb.prepare_task_data(task.train, task=t) if kwargs is None else task.train
            trainer = pl.Trainer(accelerator=ACCELERATOR, devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                 callbacks=[cb, make_probe(cb, problems, checked)])
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True))
    except Exception as e:  # noqa: BLE001 - reported on the callback's line; the next callback still runs
        problems.append(f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - start
    sites = len(cb.server) if cb.server is not None else 0
    if len(checked) != NUM_TASKS and not problems:
        problems.append(f"{len(checked)} of {NUM_TASKS} tasks checked")
    if problems:
        print(f"{name}: FAIL ({sites} sites, {seconds:.1f} s): " + "; ".join(problems[:5]))
        return False
    n, device = checked[-1]
    print(f"{name}: ok, {sites} sites, {n} posterior tensors on {device}, all finite ({seconds:.1f} s)")
    return True


def main() -> int:
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False, nothing run")
        return 0
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = [run(name, kwargs) for name, kwargs in METHODS.items()]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
