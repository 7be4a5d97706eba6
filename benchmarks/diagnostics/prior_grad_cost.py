"""Cost of the diagonal prior gradient beside one forward+backward pass (batch 64, MLP 2x256), outside Lightning,
at 2 and 1 threads (300 steps each, after a warm-up).

    BAYESCL_DATA=../shared/data python benchmarks/diagnostics/prior_grad_cost.py
"""

import logging
import time
import warnings

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from bayescl import ClassifierModule, LaplaceCallback, MultiHeadMLP, make_stream

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
stream = make_stream("split-mnist-task", limit=2000)
torch.manual_seed(0)
module = ClassifierModule(MultiHeadMLP(), num_tasks=5)
cb = LaplaceCallback(structure="diag", lam=100.0)
pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", logger=False, enable_checkpointing=False,
           enable_progress_bar=False, enable_model_summary=False).fit(module, DataLoader(stream[0].train, batch_size=64))
cb.num_examples = 12000
x, y, t = next(iter(DataLoader(stream[1].train, batch_size=64)))


def step():
    module.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(module(x, t), y).backward()


for threads in (2, 1):
    torch.set_num_threads(threads)
    for _ in range(20):
        step()
        cb.add_prior_grad(module)
    n, ts, tp = 300, 0.0, 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        cb.add_prior_grad(module)
        ts, tp = ts + t1 - t0, tp + time.perf_counter() - t1
    print(f"threads {threads}: forward+backward {ts / n * 1e3:.3f} ms, prior gradient {tp / n * 1e3:.3f} ms")
