"""How much curvature a tempered likelihood gives a confident optimum (issue 16, docs/defaults.md).

Trains the split-MNIST task-IL MLP trunk (784-256-256, a 2-way head) on task 1 (digits 0/1, 6000 examples, 5 epochs,
Adam 1e-3, batch 64), then prints the logit margins and the trace of the exact diagonal Fisher summed over the
examples for the likelihood softmax(f/T), T = 1, 2, 4, 8, 16.

    BAYESCL_DATA=../shared/data python benchmarks/diagnostics/fisher_temperature.py
"""

import os

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescl.curvature import diag_fisher

torch.manual_seed(0)
ds = torchvision.datasets.MNIST(os.environ.get("BAYESCL_DATA", "data"), train=True)
x, y = ds.data.float().div(255).view(-1, 784), ds.targets
keep = (y == 0) | (y == 1)
x, y = x[keep][:6000], y[keep][:6000]
net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
opt = torch.optim.Adam(net.parameters(), 1e-3)
for _ in range(5):
    for xb, yb in DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
with torch.no_grad():
    top2 = net(x).topk(2, -1).values
margin = top2[:, 0] - top2[:, 1]
print("logit margin quantiles 10/50/90 %:", [round(float(margin.quantile(q)), 1) for q in (0.1, 0.5, 0.9)])
for T in (1, 2, 4, 8, 16):
    F = diag_fisher(net, DataLoader(TensorDataset(x, y), batch_size=500), fisher="exact", temperature=T)
    print(f"T={T:>2}: Fisher trace {sum(float(v.sum()) for v in F.values()):.3g}, first layer {float(F['0.weight'].sum()):.3g}")
