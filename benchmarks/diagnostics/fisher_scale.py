"""How large a task's Fisher is, per benchmark (issue 16: why one ``lam`` on the raw curvature cannot suit them all).

For split-MNIST task-IL, split-MNIST domain-IL (MLP 2x256, 5 epochs) and permuted MNIST (MLP 2x100, 3 epochs), it
trains naive fine-tuning (Adam 1e-3, batch 64, 90 % of each task's training data, seed 0) on the first two tasks and
prints, after each, the diagonal Monte Carlo Fisher summed over the task's examples (``LaplaceCallback``'s default
curvature): its mean over the weights it touches, the same per example (what ``normalize=True`` divides by, see
:func:`bayescl.gaussian.mean_precision`), and the mean of each layer.

    BAYESCL_DATA=../shared/data python benchmarks/diagnostics/fisher_scale.py
"""

import torch
import torch.nn.functional as F

from bayescl.curvature import diag_fisher
from bayescl.gaussian import DiagGaussian, mean_precision
from bayescl.harness.data import make_stream
from bayescl.harness.models import MLP, MultiHeadMLP

torch.manual_seed(0)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
print("| benchmark | task | N | mean Fisher per weight (summed over N) | per example | per layer (summed) |")
print("|---|---|---|---|---|---|")
for scenario, hidden, epochs in [("split-mnist-task", (256, 256), 5), ("split-mnist-domain", (256, 256), 5),
                                 ("permuted-mnist", (100, 100), 3)]:
    torch.manual_seed(0)
    stream = make_stream(scenario, val_fraction=0.1, seed=0)
    net = (MultiHeadMLP(hidden=hidden, num_tasks=len(stream)) if stream.with_task_id
           else MLP(hidden=hidden, num_classes=stream.num_classes))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for t in range(2):
        task = stream[t]
        for epoch in range(epochs):
            loader = task.train_dataloader(batch_size=64, seed=0)
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                out = net(batch[0], batch[2]) if stream.with_task_id else net(batch[0])
                opt.zero_grad()
                F.cross_entropy(out, batch[1]).backward()
                opt.step()
        fisher = diag_fisher(net, task.train_dataloader(batch_size=256, shuffle=False), fisher="mc",
                             generator=torch.Generator().manual_seed(0))
        site = DiagGaussian.from_mean_precision({n: torch.zeros_like(v) for n, v in fisher.items()}, fisher)
        n = len(task.train)
        layers = ", ".join(f"{k} {float(v[v > 0].mean()):.2g}" for k, v in fisher.items()
                           if k.endswith("weight") and bool((v > 0).any()))
        print(f"| {scenario} | {t + 1} | {n} | {mean_precision(site):.3g} | {mean_precision(site) / n:.3g} | {layers} |",
              flush=True)
