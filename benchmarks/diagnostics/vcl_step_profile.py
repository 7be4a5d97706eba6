"""Where a VCL training step goes (batch 64, multi-head MLP 2x256, split-MNIST shapes), outside Lightning.

Times the parts of one step for naive training and for VCL with 1 and 10 Monte Carlo samples (the 10 as one pass
over the repeated batch): forward+backward, the closed-form KL gradient, Adam. Beside them, the estimator
bayescl does not use: one weight sample shared by the whole minibatch (the VCL paper's code; one matrix product per
layer instead of two, but ``P`` normal draws per step), swapped into the same layers. Then the 12 most expensive
operators of the 10-sample forward+backward (torch.profiler, grouped by input shape).

    python benchmarks/diagnostics/vcl_step_profile.py > benchmarks/results/diagnostics/vcl_step_profile.txt
"""

import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import profile

from bayescl import ClassifierModule, MultiHeadMLP, VCLCallback
from bayescl.methods.variational import BayesLinear, tiled


def shared_weight_forward(self, x):
    """``BayesLinear.forward`` with one weight sample for the whole minibatch (for comparison only)."""
    w = self.weight_mu + (0.5 * self.weight_logvar).exp() * torch.randn_like(self.weight_mu)
    b = self.bias_mu + (0.5 * self.bias_logvar).exp() * torch.randn_like(self.bias_mu)
    return F.linear(x, w, b)


def median_ms(f, n=300):
    for _ in range(20):
        f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def parts(samples, shared_weights=False):
    torch.manual_seed(0)
    module = ClassifierModule(MultiHeadMLP(), num_tasks=5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 2, (64,), generator=g)
    t = torch.zeros(64, dtype=torch.long)
    cb = None
    if samples:
        cb = VCLCallback(train_samples=samples, ml_init=False, test_samples=1)
        cb.setup(None, module, "fit")
        cb.num_examples = 12000
        if shared_weights:
            for m in module.modules():
                if isinstance(m, BayesLinear):
                    m.forward = shared_weight_forward.__get__(m)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        if samples:
            with tiled(module, (x, y, t), samples) as (xx, yy, tt):
                F.cross_entropy(module(xx, tt), yy).backward()
        else:
            F.cross_entropy(module(x, t), y).backward()

    fwd_bwd()
    out = {"forward+backward": median_ms(fwd_bwd)}
    if cb is not None:
        out["KL gradient"] = median_ms(lambda: cb.add_prior_grad(module, value=False))  # a step between logging steps
    out["Adam step"] = median_ms(opt.step)
    return out, fwd_bwd


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of 300 calls (ms)\n")
    rows = {}
    for name, k in (("naive", 0), ("vcl, 1 sample", 1), ("vcl, 10 samples", 10)):
        rows[name], fwd_bwd = parts(k)
    rows["1 weight sample per minibatch (not bayescl's)"], _ = parts(1, shared_weights=True)
    base = sum(rows["naive"].values())
    print("| method | forward+backward | KL gradient | Adam step | sum | sum / naive |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        total = sum(r.values())
        print(f"| {name} | {r['forward+backward']:.3f} | {r.get('KL gradient', 0.0):.3f} | {r['Adam step']:.3f} "
              f"| {total:.3f} | {total / base:.2f} |")
    with profile(record_shapes=True) as prof:
        for _ in range(50):
            fwd_bwd()
    print("\nvcl, 10 samples: forward+backward, 50 calls, top operators by self CPU time")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12,
                                                             max_name_column_width=28,
                                                             max_shapes_column_width=48))


if __name__ == "__main__":
    main()
