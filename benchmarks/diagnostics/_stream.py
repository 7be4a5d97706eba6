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
