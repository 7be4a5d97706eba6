"""How far VCL's log-variances move in one task (split-MNIST task 1, 5 epochs, batch 64, seed 1).

Prints per layer the mean/min/max log-variance after the task, for the recipe's Adam step on every parameter
(``--lr-scale 1``) and with a larger learning rate on the log-variances only (``--lr-scale 10``, the
"converged variances" experiment), and the accuracy on the seen tasks after each of ``--tasks`` tasks.

    BAYESCL_DATA=../shared/data python benchmarks/diagnostics/vcl_logvar_drift.py --logvar-init -6 --tasks 1
    BAYESCL_DATA=../shared/data python benchmarks/diagnostics/vcl_logvar_drift.py --logvar-init -6 --tasks 4 --lr-scale 10
"""

import argparse

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from bayescl import ClassifierModule, VCLCallback
from bayescl.harness.bench import BenchConfig, _quiet_lightning, _stream, default_model

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--tasks", type=int, default=1)
ap.add_argument("--epochs", type=int, default=5)
ap.add_argument("--logvar-init", type=float, default=-6.0)
ap.add_argument("--lr-scale", type=float, default=1.0, help="learning-rate multiplier of the log-variances")
args = ap.parse_args()
_quiet_lightning()
pl.seed_everything(args.seed, verbose=False)
stream = _stream(BenchConfig(scenario="split-mnist-task", strategy="vcl"), args.seed)


class Module(ClassifierModule):
    def configure_optimizers(self):
        lv = [p for n, p in self.named_parameters() if n.endswith("_logvar")]
        rest = [p for n, p in self.named_parameters() if not n.endswith("_logvar")]
        return torch.optim.Adam([{"params": rest}, {"params": lv, "lr": self.lr * args.lr_scale}], lr=self.lr)


module = Module(default_model(stream), num_tasks=len(stream))
cb = VCLCallback(test_samples=20, logvar_init=args.logvar_init)
tests = [t.test_dataloader() for t in stream]
for i, task in enumerate(stream.tasks[: args.tasks]):
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[cb], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, DataLoader(task.train, batch_size=64, shuffle=True))
    module.stage = i
    trainer.test(module, dataloaders=tests, verbose=False)
    row = module.acc_matrix.compute()[i][: i + 1]
    print(f"after task {i}: accuracy on seen tasks {[round(float(a), 3) for a in row]}, mean {float(row.mean()):.4f}")
    for path, layer in cb.layers(module).items():
        if "trunk" in path:
            lv = layer.weight_logvar.detach()
            print(f"  {path}: log-variance mean {lv.mean():.2f} min {lv.min():.2f} max {lv.max():.2f}")
