"""The report's numbers: one ECE for tables and plots, the predictive's accuracy beside the network's with a
warning when it falls far below, per-stage AUROC, and no "± 0.00" for a single seed."""

import json

import numpy as np
import pytest
import torch

from bayescl.harness.report import markdown_table, write_report
from bayescl.harness.report_uncertainty import (
    accuracy_warnings,
    fmt,
    seen_ece,
    stage_table,
    uncertainty_arrays,
    uncertainty_table,
)
from bayescl.methods.uncertainty import PredictiveUncertainty, ece_from_bins


def _run(strategy="laplace-kron", T=3, seeds=1, pred_drop=0.0, seed=0):
    """A result document with stage records built from random predictive samples (network accuracy 0.95 on every
    task, the predictive's ``pred_drop`` lower)."""
    g = torch.Generator().manual_seed(seed)
    per_seed = []
    for s in range(seeds):
        R = [[(0.95 if j <= i else 0.5) for j in range(T)] for i in range(T)]
        recs = []
        for i in range(T):
            tasks = []
            for j in range(T):
                m = PredictiveUncertainty()
                scale = 3.0 if j <= i else 0.3  # sharper on trained tasks
                m.update(torch.softmax(scale * torch.randn(4, 40, 2, generator=g), -1), torch.randint(0, 2, (40,)))
                out = m.compute()
                t = {"task": j, "count": int(out["count"]), "net_accuracy": 0.95}
                t.update({k: float(out[k]) for k in ("accuracy", "total", "aleatoric", "epistemic", "nll", "ece")})
                t["accuracy"] = 0.95 - pred_drop
                t.update({k: v.tolist() for k, v in m.reliability().items()})
                tasks.append(t)
            recs.append({"stage": i, "source": "posterior", "method": "glm", "n_samples": 4, "max_examples": 40,
                         "n_bins": 15, "auroc_epistemic": None if i == T - 1 else 0.8 + 0.05 * s,
                         "auroc_total": None if i == T - 1 else 0.7, "tasks": tasks})
        per_seed.append({"seed": s, "accuracy_matrix": R, "avg_accuracy": 0.95, "bwt": -0.01 * s,
                         "forgetting": 0.0, "wall_seconds": 1.0, "fit_seconds": 0.5, "uncertainty": recs})
    ms = {"mean": 0.95, "std": 0.0 if seeds == 1 else 0.01}
    return {"scenario": "split-mnist-task", "strategy": strategy, "command": f"bayescl bench {strategy}",
            "config": {"epochs": 1}, "seeds": list(range(seeds)), "per_seed": per_seed,
            "accuracy_matrix": [p["accuracy_matrix"] for p in per_seed], "avg_accuracy": ms, "bwt": ms,
            "forgetting": ms, "wall_seconds": {"mean": 2.0, "std": 0.0}, "fit_seconds": ms, "peak_rss_mb": 1.0}


def test_one_seed_shows_values_alone_and_several_show_mean_and_std():
    assert fmt([0.5], 100) == "50.00" and fmt([0.5, 0.7], 100) == "60.00 ± 14.14" and fmt([np.nan]) == "—"
    one = markdown_table([_run(seeds=1)])
    assert "| laplace-kron | 95.00 | 95.00 | 95.00 |" in one and "±" not in one
    assert "95.00 ± 1.00" in markdown_table([_run(seeds=2)])
    table = uncertainty_table([_run(seeds=1)])
    assert "±" not in table and "±" in uncertainty_table([_run(seeds=2)])


def test_ece_of_table_and_reliability_diagram_is_one_computation(tmp_path, monkeypatch):
    import matplotlib.axes

    run = _run(seeds=2)
    u = uncertainty_arrays(run)
    last = 2
    # the reference: every example of the seen tasks and seeds in one set of bins
    bins = [torch.tensor(u[k][:, last, : last + 1].sum(axis=(0, 1)))
            for k in ("bin_count", "bin_confidence", "bin_correct")]
    ref = 100 * float(ece_from_bins(*bins))
    assert seen_ece(u, last) * 100 == pytest.approx(ref)
    assert abs(ref - 100 * np.nanmean(u["ece"][:, last, : last + 1])) > 0.05  # pooled != mean of per-task ECEs
    titles = []
    orig = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, label, *a, **k: (titles.append(label), orig(self, label, *a, **k))[1])
    d = tmp_path / "split-mnist-task"
    d.mkdir()
    (d / "laplace-kron.json").write_text(json.dumps(run))
    write_report(tmp_path)
    shown = f"{ref:.2f}"
    assert any(f"ECE {shown}%" in t for t in titles)
    row = next(line for line in (d / "README.md").read_text().splitlines() if line.startswith("| laplace-kron | post"))
    assert f"| {shown} |" in row


def test_predictive_accuracy_beside_the_network_and_a_warning_when_far_below(tmp_path):
    fine, bad = _run("fine"), _run("bad", pred_drop=0.2)
    assert accuracy_warnings([fine]) == []
    warned = accuracy_warnings([bad])
    assert len(warned) == 3 and "bad: after task 1" in warned[0] and "95.00 %" in warned[0]
    d = tmp_path / "split-mnist-task"
    d.mkdir()
    for r in (fine, bad):
        (d / f"{r['strategy']}.json").write_text(json.dumps(r))
    with pytest.warns(UserWarning, match="bad: after task 3 the predictive"):
        write_report(tmp_path)
    page = (d / "README.md").read_text()
    assert "network acc (%) | predictive acc (%)" in page and "**Warning**: bad: after task 3" in page
    assert "**Warning**: fine" not in page
    row = next(line for line in page.splitlines() if line.startswith("| bad | posterior (glm) |"))
    assert row.split("|")[3].strip() == "95.00"


def test_stage_table_has_auroc_per_stage_and_none_after_the_last_task():
    table = stage_table([_run(seeds=2)])
    rows = [line for line in table.splitlines() if line.startswith("| laplace-kron |")]
    assert len(rows) == 3
    assert "| 0.825 ± 0.035 | 0.700 ± 0.000 |" in rows[0]
    assert rows[2].endswith("| — | — |")
    u = uncertainty_arrays(_run(seeds=1))
    assert u["auroc_epistemic"].shape == (1, 3) and np.isnan(u["auroc_epistemic"][0, 2])
