"""Would another epistemic score than the mutual information tell trained from future tasks?

The harness's AUROC (``bayescl.methods.uncertainty.evaluate_uncertainty``) scores each input by the epistemic part
of the predictive entropy, the mutual information (MI) ``H[E p] - E H[p]``. The MI is small where the network is
confident whatever the posterior's spread, so on domain-IL, where the old tasks are forgotten (about chance), it is
as high on old tasks as on future ones (``epistemic_groups.py``). The posterior's own spread in function space does
not depend on the mean's confidence: the variance of the logits, ``tr(P J Σ Jᵀ P)`` for Laplace's linearised
predictive (``P`` centres the logits: softmax ignores a shift), the variance of the centred logits over ``S``
weight draws for VCL. If the posterior knew which inputs its data constrained, that variance would be low on
trained tasks (old ones included) and high on future ones.

This trains the default callback through a stream as ``bayescl bench`` does and, after every task, computes on the
**validation** inputs (500 per task, 16 samples) the AUROC of both scores for trained (tasks <= i) against future
(tasks > i) inputs, and the mean logit variance of the task just trained, the older tasks and the future ones. No
test data is read.

    python benchmarks/diagnostics/epistemic_scores.py --root ../shared/data \
        > benchmarks/results/diagnostics/epistemic_scores.txt
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from _stream import default_setup, fit_task, main_over_runs

from bayescl._batches import split_batch
from bayescl._params import eval_mode
from bayescl.methods.predictive import glm_logit_covariance, glm_samples
from bayescl.methods.predictive_samples import posterior_for
from bayescl.methods.uncertainty import decompose, stage_auroc
from bayescl.methods.variational_predictive import raw_samples

SAMPLES = 16
PER_TASK = 500


@torch.no_grad()
def scores(module: pl.LightningModule, posterior, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Per input: the MI of ``SAMPLES`` predictive samples and the variance of the centred logits."""
    if posterior is not None:  # Laplace: the linearised predictive the harness samples
        logits, cov = glm_logit_covariance(module, posterior, inputs)
        C = cov.shape[-1]
        P = torch.eye(C, dtype=cov.dtype) - 1.0 / C
        logit_var = torch.diagonal(P @ cov @ P, dim1=-2, dim2=-1).sum(-1)
        probs = glm_samples(logits, cov, SAMPLES)
    else:  # VCL: the layers draw their own weights
        with raw_samples(module):
            f = torch.stack([module(*inputs) for _ in range(SAMPLES)])
        f = f - f.mean(-1, keepdim=True)
        logit_var = f.var(0).sum(-1)
        probs = torch.softmax(f, -1)
    return {"mi": decompose(probs)["epistemic"].double(), "logit variance": logit_var.double()}


def stage_scores(module: pl.LightningModule, posterior, loaders) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {"mi": [], "logit variance": []}
    with eval_mode(module):
        for loader in loaders:
            got: dict[str, list[torch.Tensor]] = {k: [] for k in out}
            n = 0
            for batch in loader:
                inputs, y = split_batch(batch)
                for k, v in scores(module, posterior, inputs).items():
                    got[k].append(v)
                n += y.numel()
                if n >= PER_TASK:
                    break
            for k, kept in out.items():
                kept.append(torch.cat(got[k])[:PER_TASK])
    return out


def run(scenario: str, method: str, root: str | None, epochs: int, seed: int) -> list[str]:
    stream, module, cb, val = default_setup(scenario, method, root, seed)
    rows = []
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    for i, task in enumerate(stream):
        fit_task(module, cb, task, epochs, seed)
        if i == len(stream) - 1:
            break  # no future task left to tell apart
        s = stage_scores(module, posterior_for([cb], module), val)
        lv = [float(t.mean()) for t in s["logit variance"]]
        older = sum(lv[:i]) / i if i else float("nan")
        rows.append((i + 1, stage_auroc(s["mi"], i), stage_auroc(s["logit variance"], i), lv[i], older,
                     sum(lv[i + 1:]) / len(lv[i + 1:])))
    total = time.perf_counter() - t0
    title = (f"## {scenario}, {type(cb).__name__}() ({len(stream)} tasks, {epochs} epochs, seed {seed}, validation "
             f"inputs; {total:.0f} s)")
    header = "| after task | AUROC, MI | AUROC, logit variance | logit variance: just trained / older / future |"
    lines = [title, "", header, "|---|---|---|---|"]
    for n, a_mi, a_lv, cur, old, fut in rows:
        lines.append(f"| {n} | {a_mi:.3f} | {a_lv:.3f} | {cur:.3f} / {old:.3f} / {fut:.3f} |")
    return lines


def main(argv=None) -> None:
    main_over_runs(__doc__, run, ["split-mnist-domain:laplace:5", "split-mnist-domain:vcl:5", "permuted-mnist:vcl:3"],
                   argv)


if __name__ == "__main__":
    main()
