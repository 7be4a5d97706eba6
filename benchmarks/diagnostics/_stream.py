"""What the stream diagnostics share: quiet libraries and a header line, and one task fitted the way ``bayescl
bench`` fits it (a new Trainer per task, CPU, batch 64, the task's own seeded order, no logger or checkpoints)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

import pytorch_lightning as pl
import torch


def parser(doc: str) -> argparse.ArgumentParser:
    """The diagnostic's argument parser with ``--root`` (the data) and ``--seed``; the caller adds ``--runs``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--root", default=None, help="data root (default: $BAYESCL_DATA, else ./data)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def start() -> None:
    """Silence Lightning's info logs and warnings; print the torch version, threads and the command."""
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads. `{' '.join(['python', *sys.argv])}`\n")


def fit_task(module: pl.LightningModule, callback: pl.Callback, task, epochs: int, seed: int) -> None:
    """Fit ``module`` on ``task``'s training data with ``callback``, as one task of ``bayescl bench``."""
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, task.train_dataloader(batch_size=64, seed=seed))


def default_setup(scenario: str, method: str, root: str | None, seed: int):
    """``(stream, module, callback, validation loaders)`` for ``method`` (``"vcl"`` or ``"laplace"``: the callbacks'
    defaults) on ``scenario``'s MLP, 10 % of each task held out, seeded as ``bayescl bench`` seeds a run."""
    from bayescl import ClassifierModule, LaplaceCallback, VCLCallback, make_stream
    from bayescl.harness.bench import default_model

    pl.seed_everything(seed, verbose=False)
    stream = make_stream(scenario, root=root, seed=seed, val_fraction=0.1)
    module = ClassifierModule(default_model(stream, "mlp"), num_tasks=len(stream))
    callback = VCLCallback() if method == "vcl" else LaplaceCallback()
    return stream, module, callback, [t.val_dataloader() for t in stream]


def main_over_runs(doc: str, run, default_runs: list[str], argv=None) -> None:
    """Parse ``--root --seed --runs scenario:method:epochs ...`` and print ``run(scenario, method, root, epochs,
    seed)``'s lines for each triple (method: ``vcl`` or ``laplace``, the callbacks' defaults)."""
    ap = parser(doc)
    ap.add_argument("--runs", nargs="+", default=default_runs,
                    help="scenario:method:epochs triples (method: vcl or laplace, the callbacks' defaults)")
    args = ap.parse_args(argv)
    start()
    for spec in args.runs:
        scenario, method, epochs = spec.split(":")
        print("\n".join(run(scenario, method, args.root, int(epochs), args.seed)) + "\n", flush=True)
