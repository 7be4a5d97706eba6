"""The Laplace predictive on split-MNIST task 1 (2000 examples, 1 epoch) with the training prior precision and
with the evidence-fitted one: fitted τ, predictive accuracy and epistemic uncertainty (16 linearised samples).

    BAYESCL_DATA=../shared/data python benchmarks/diagnostics/laplace_predictive.py
"""

import logging
import warnings

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from bayescl import ClassifierModule, LaplaceCallback, MultiHeadMLP, make_stream
from bayescl.methods.uncertainty import decompose, mc_probs

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
stream = make_stream("split-mnist-task", limit=2000)
for structure, lam in (("diag", 1.0), ("kron", 100.0)):
    torch.manual_seed(0)
    module = ClassifierModule(MultiHeadMLP(), num_tasks=5)
    cb = LaplaceCallback(structure=structure, lam=lam, online=True)
    pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        module, DataLoader(stream[0].train, batch_size=64, shuffle=True))
    q, qp = cb.posterior(), cb.predictive_posterior()
    x, y, t = next(iter(DataLoader(stream[0].test, batch_size=500)))
    with torch.no_grad():
        acc_map = float((module(x, t).argmax(-1) == y).float().mean())
    print(f"{structure} (lam {lam}): fitted prior precision {cb.fitted_prior_precision:.4g}, MAP accuracy {acc_map:.3f}")
    for post, name in ((q, "training prior 1e-4"), (qp, "fitted prior")):
        p = mc_probs(module, post, (x, t), n_samples=16, generator=torch.Generator().manual_seed(0))
        d = decompose(p)
        acc = float((p.mean(0).argmax(-1) == y).float().mean())
        print(f"  {name}: predictive accuracy {acc:.3f}, epistemic {float(d['epistemic'].mean()):.3f} nats")
