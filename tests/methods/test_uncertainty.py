import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_calibration_error

from bayescl.gaussian.diag import DiagGaussian
from bayescl.harness.models import MultiHeadMLP
from bayescl.harness.report import PUBLISHED, load_results, write_report
from bayescl.methods.predictive import predictive
from bayescl.methods.uncertainty import (
    PredictiveUncertainty,
    TaskUncertainty,
    decompose,
    evaluate_uncertainty,
    mc_probs,
    posterior_for,
    stage_records_to_arrays,
)

LOG2 = math.log(2.0)


# ------------------------------------------------------------------------------------------ the decomposition
def test_disagreeing_confident_samples_are_purely_epistemic():
    p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)  # (S=2, B=1, C=2)
    d = decompose(p)
    assert d["total"].item() == pytest.approx(LOG2, abs=1e-12)
    assert d["aleatoric"].item() == pytest.approx(0.0, abs=1e-12)
    assert d["epistemic"].item() == pytest.approx(LOG2, abs=1e-12)


def test_identical_samples_are_purely_aleatoric():
    row = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    h = -(row * row.log()).sum().item()
    d = decompose(row.expand(7, 4, 3))
    torch.testing.assert_close(d["total"], torch.full((4,), h, dtype=torch.float64))
    torch.testing.assert_close(d["aleatoric"], torch.full((4,), h, dtype=torch.float64))
    assert d["epistemic"].abs().max() < 1e-12
    # a single predictive (B, C) is one sample
    assert decompose(row.expand(4, 3))["epistemic"].abs().max() == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(2, 6), st.floats(0.1, 10.0), st.integers(0, 2**31 - 1))
def test_mutual_information_is_nonnegative_and_parts_add_up(S, B, C, scale, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(S, B, C, generator=g, dtype=torch.float64), -1)
    d = decompose(probs)
    assert bool((d["epistemic"] >= 0).all())
    assert bool((d["aleatoric"] >= 0).all()) and bool((d["total"] <= math.log(C) + 1e-12).all())
    torch.testing.assert_close(d["total"], d["aleatoric"] + d["epistemic"], atol=1e-12, rtol=0)


def test_inputs_must_be_probabilities():
    with pytest.raises(ValueError, match="apply softmax"):
        decompose(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"shape \(S, B, C\) or \(B, C\)"):
        decompose(torch.ones(3))
    m = PredictiveUncertainty()
    with pytest.raises(ValueError, match="target must have shape"):
        m.update(torch.full((2, 3), 1 / 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        m.update(torch.full((2, 3), 1 / 3), torch.tensor([0, 3]))


# ------------------------------------------------------------------------------------------ ECE and NLL
def test_ece_against_a_hand_computed_value():
    # confidences 0.65, 0.75 (bin [0.6, 0.8), both right) and 0.85 (wrong), 0.95 (right) (bin [0.8, 1])
    conf = torch.tensor([0.65, 0.75, 0.85, 0.95], dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], -1)
    y = torch.tensor([0, 0, 1, 0])
    m = PredictiveUncertainty(n_bins=5)
    m.update(probs, y)
    # 2/4 * |1 - 0.7| + 2/4 * |0.5 - 0.9| = 0.15 + 0.2
    assert m.compute()["ece"].item() == pytest.approx(0.35, abs=1e-12)
    rel = m.reliability()
    assert rel["bin_count"].tolist() == [0, 0, 0, 2, 2] and rel["bin_correct"].tolist() == [0, 0, 0, 2, 1]
    assert float(rel["bin_confidence"][4]) == pytest.approx(1.8)


def test_ece_equals_torchmetrics_on_the_predictive_mean():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(2 * torch.randn(8, 300, 4, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, 4, (300,), generator=g)
    m = PredictiveUncertainty()
    m.update(probs[:, :100], y[:100])
    m.update(probs[:, 100:], y[100:])  # sums accumulate across batches
    ref = multiclass_calibration_error(probs.mean(0), y, num_classes=4, n_bins=15, norm="l1")
    assert m.compute()["ece"].item() == pytest.approx(ref.item(), abs=1e-6)


def test_nll_and_accuracy_against_hand_computed_values():
    # two samples whose mean is [0.25, 0.75] for both examples
    probs = torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    m = PredictiveUncertainty()
    m.update(probs, y)
    out = m.compute()
    assert out["nll"].item() == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2, abs=1e-12)
    assert out["accuracy"].item() == 0.5 and int(out["count"]) == 2
    h_mean = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert out["total"].item() == pytest.approx(h_mean, abs=1e-12)
    assert out["aleatoric"].item() == pytest.approx(LOG2 / 2, abs=1e-12)
    assert out["epistemic"].item() == pytest.approx(h_mean - LOG2 / 2, abs=1e-12)


def test_task_uncertainty_keeps_stage_and_task_apart():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 50, 3, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, 3, (50,), generator=g)
    tu, pu = TaskUncertainty(num_tasks=3, n_bins=10), PredictiveUncertainty(n_bins=10)
    tu.update(probs, y, stage=1, task=0)
    pu.update(probs, y)
    out, ref = tu.compute(), pu.compute()
    for k in ("total", "aleatoric", "epistemic", "nll", "ece", "accuracy"):
        assert out[k].shape == (3, 3) and out[k][1, 0].item() == pytest.approx(ref[k].item(), abs=1e-12)
        assert torch.isnan(out[k][0]).all() and torch.isnan(out[k][1, 1:]).all()
    assert tu.reliability()["bin_count"][1, 0].tolist() == pu.reliability()["bin_count"].tolist()
    with pytest.raises(ValueError, match="task=3 is out of range"):
        tu.update(probs, y, stage=0, task=3)


# ------------------------------------------------------------------------------------------ sampling
def test_zero_variance_posterior_gives_zero_epistemic_uncertainty(tiny):
    model = tiny(8)
    x = torch.randn(20, 4, dtype=torch.float64)
    q = DiagGaussian.isotropic(model, precision=1e14, mean="current")
    s = mc_probs(model, q, (x,), n_samples=8, generator=torch.Generator().manual_seed(0))
    assert s.shape == (8, 20, 3)
    torch.testing.assert_close(s.mean(0), torch.softmax(model(x), -1), atol=1e-6, rtol=0)
    assert decompose(s)["epistemic"].max() < 1e-10
    # a broad posterior is uncertain about the weights
    wide = DiagGaussian.isotropic(model, precision=1.0, mean="current")
    assert decompose(mc_probs(model, wide, (x,), n_samples=8))["epistemic"].mean() > 1e-3


def test_mc_probs_are_the_samples_whose_mean_predictive_returns(tiny):
    model = tiny(8)
    x = torch.randn(5, 4, dtype=torch.float64)
    q = DiagGaussian.isotropic(model, precision=10.0, mean="current")
    for method in ("mc", "glm"):
        s = mc_probs(model, q, (x,), n_samples=6, generator=torch.Generator().manual_seed(1), method=method)
        p = predictive(model, q, (x,), method, n_samples=6, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(s.mean(0), p)
    with pytest.raises(ValueError, match="method='exact'"):
        mc_probs(model, q, (x,), method="exact")


def _loaders(T=2, n=40, with_task=False):
    g = torch.Generator().manual_seed(0)
    out = []
    for j in range(T):
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 2, (n,), generator=g)
        items = (x, y, torch.full((n,), j)) if with_task else (x, y)
        out.append(DataLoader(TensorDataset(*items), batch_size=16))
    return out


def test_evaluate_uncertainty_record_schema_and_zero_variance():
    model = MultiHeadMLP(in_features=4, hidden=(8,), num_tasks=2).double()
    q = DiagGaussian.isotropic(model, precision=1e14, mean="current")
    state = torch.get_rng_state()
    rec = evaluate_uncertainty(model, q, _loaders(with_task=True), stage=0, n_samples=4, max_examples=25)
    assert torch.equal(state, torch.get_rng_state())  # the training stream's randomness is untouched
    assert rec["stage"] == 0 and rec["source"] == "posterior" and rec["n_samples"] == 4 and rec["n_bins"] == 15
    assert [t["task"] for t in rec["tasks"]] == [0, 1]
    for t in rec["tasks"]:
        assert t["count"] == 25 and sum(t["bin_count"]) == 25 and len(t["bin_confidence"]) == 15
        assert 0 <= t["epistemic"] < 1e-10 and t["total"] == pytest.approx(t["aleatoric"], abs=1e-10)
        assert math.isfinite(t["nll"]) and 0 <= t["ece"] <= 1 and 0 <= t["accuracy"] <= 1
    json.dumps(rec)  # JSON-ready
    # the same fixed subset and seed at every call
    assert evaluate_uncertainty(model, q, _loaders(with_task=True), 0, 4, 25) == rec


def test_point_estimate_and_self_sampling_models(tiny):
    from bayescl.methods.variational import convert

    model = tiny(8)
    rec = evaluate_uncertainty(model, None, _loaders(), stage=1, n_samples=4)
    assert rec["source"] == "point" and rec["n_samples"] == 1
    assert all(t["epistemic"] == 0 for t in rec["tasks"])
    vmodel = convert(tiny(8), logvar_init=-2.0)
    rec = evaluate_uncertainty(vmodel, None, _loaders(), stage=0, n_samples=4)
    assert rec["source"] == "model" and all(t["epistemic"] > 0 for t in rec["tasks"])
    arrays = stage_records_to_arrays([rec], num_tasks=2)
    assert arrays["epistemic"][0, 1] == rec["tasks"][1]["epistemic"] and torch.isnan(arrays["epistemic"][1]).all()


def test_posterior_for_picks_a_matching_posterior(tiny):
    model = tiny(8)
    q = DiagGaussian.isotropic(model, precision=1.0)

    class WithPosterior:
        def __init__(self, q):
            self.q = q

        def posterior(self):
            if self.q is None:
                raise RuntimeError("no posterior yet")
            return self.q

    other = DiagGaussian.isotropic({"w": torch.zeros(2)}, 1.0)  # e.g. VCL's logical names
    assert posterior_for([object(), WithPosterior(None), WithPosterior(other), WithPosterior(q)], model) is q
    assert posterior_for([WithPosterior(other)], model) is None


# ------------------------------------------------------------------------------------------ the report
def _fake_run(strategy, T=3, seeds=2, uncertainty=True):
    g = torch.Generator().manual_seed(len(strategy))
    per_seed, mats = [], []
    for s in range(seeds):
        R = [[(0.9 if j <= i else 0.5) for j in range(T)] for i in range(T)]
        run = {"seed": s, "accuracy_matrix": R, "avg_accuracy": 0.9, "bwt": 0.0, "forgetting": 0.0,
               "wall_seconds": 1.0, "fit_seconds": 0.5}
        if uncertainty:
            recs = []
            for i in range(T):
                tasks = []
                for j in range(T):
                    m = PredictiveUncertainty()
                    m.update(torch.softmax(3 * torch.randn(4, 30, 2, generator=g), -1), torch.randint(0, 2, (30,)))
                    out = m.compute()
                    t = {"task": j, "count": int(out["count"])}
                    t.update({k: float(out[k]) for k in ("accuracy", "total", "aleatoric", "epistemic", "nll", "ece")})
                    t.update({k: v.tolist() for k, v in m.reliability().items()})
                    tasks.append(t)
                recs.append({"stage": i, "source": "posterior", "n_samples": 4, "max_examples": 30, "n_bins": 15,
                             "tasks": tasks})
            run["uncertainty"] = recs
        per_seed.append(run)
        mats.append(R)
    ms = {"mean": 0.9, "std": 0.01}
    return {"scenario": "split-mnist-task", "strategy": strategy, "command": f"bayescl bench {strategy}",
            "config": {"epochs": 1, "batch_size": 64, "lr": 1e-3, "model": "mlp"}, "seeds": list(range(seeds)),
            "per_seed": per_seed, "accuracy_matrix": mats, "avg_accuracy": ms, "bwt": ms, "forgetting": ms,
            "wall_seconds": {"mean": 2.0, "std": 0.0}, "fit_seconds": ms, "peak_rss_mb": 300.0}


def test_report_writes_uncertainty_plots_and_the_overview(tmp_path):
    d = tmp_path / "split-mnist-task"
    (d / "avalanche").mkdir(parents=True)
    (d / "naive.json").write_text(json.dumps(_fake_run("naive", uncertainty=False)))
    (d / "laplace-diag.json").write_text(json.dumps(_fake_run("laplace-diag")))
    # other schemas are skipped: an Avalanche export, a run whose accuracy matrix is not per seed
    (d / "avalanche" / "ewc.json").write_text(json.dumps({"strategy": "EWC", "Top1_Acc_Stream": 0.9}))
    (d / "odd.json").write_text(json.dumps({"strategy": "odd", "accuracy_matrix": [[1.0]]}))
    bad = _fake_run("broken-unc")
    bad["per_seed"][0]["uncertainty"] = [{"stage": 0}]  # malformed: the accuracy report is still written
    (d / "broken-unc.json").write_text(json.dumps(bad))
    assert [r["strategy"] for r in load_results(d)] == ["naive", "broken-unc", "laplace-diag"]

    with pytest.warns(UserWarning, match="broken-unc"):
        written = write_report(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"split-mnist-task/README.md", "split-mnist-task/reliability.png",
            "split-mnist-task/epistemic_over_time.png", "README.md"} <= names
    assert (d / "reliability.png").stat().st_size > 1000 and (d / "epistemic_over_time.png").stat().st_size > 1000
    page = (d / "README.md").read_text()
    assert "| laplace-diag | posterior |" in page and "![reliability](reliability.png)" in page
    assert "| naive | posterior" not in page
    top = (tmp_path / "README.md").read_text()
    assert "| **naive** | 90.00 ± 1.00 |" in top and "| **laplace-diag** |" in top
    assert "Nguyen et al. 2018" in top and "Hsu et al. 2018" in top and "Avalanche" in top
    assert "(split-mnist-task/reliability.png)" in top and "(split-mnist-task/README.md)" in top
    assert "EWC | 63.10" in top and "ewc.json" not in top


def test_report_without_uncertainty_sections(tmp_path):
    d = tmp_path / "permuted-mnist"
    d.mkdir()
    run = _fake_run("naive", uncertainty=False)
    run["scenario"] = "permuted-mnist"
    (d / "naive.json").write_text(json.dumps(run))
    written = write_report(tmp_path)
    assert {p.name for p in written} == {"README.md", "accuracy_matrix.png", "accuracy_over_time.png"}
    assert "Predictive uncertainty" not in (d / "README.md").read_text()
    top = (tmp_path / "README.md").read_text()
    assert "FROMP" in top and "| VCL | ~90 |" in top and "laplace-torch 0.3 online KFAC | 94.47 | 81.4" in top


def test_published_numbers_have_sources():
    assert {"split-mnist-task", "split-mnist-domain", "split-mnist-class", "permuted-mnist"} <= set(PUBLISHED)
    for rows in PUBLISHED.values():
        for e in rows:
            assert e["source"] and e["protocol"] and (e["accuracy"] is None or 0 < e["accuracy"] <= 100)


def test_plain_iterables_of_batches_are_capped_too(tiny):
    model = tiny(8)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
               for _ in range(4)]
    rec = evaluate_uncertainty(model, None, [batches], stage=0, max_examples=40)
    assert rec["tasks"][0]["count"] == 40


# ------------------------------------------------------------------------------------------ Laplace, end to end
def test_kron_laplace_predictive_is_centred_on_the_network_and_as_accurate(make_trainer, small_model):
    """The chance-level Kronecker predictive on split MNIST (λ = 100 on the raw curvature): Λ⁻¹η solved from the float32 natural
    parameters is far from the weights when the precision is ill-conditioned (base prior 1e-4 against a curvature
    of 1e4 and more), so the posterior must be centred on the optimum it was built at."""
    from bayescl import LaplaceCallback
    from bayescl.harness.data import synthetic_stream
    from bayescl.harness.module import ClassifierModule

    stream = synthetic_stream(num_tasks=2, n_train=128, n_test=48)
    module = ClassifierModule(small_model(hidden=(16,), num_tasks=2), num_tasks=2)
    cb = LaplaceCallback(structure="kron", lam=100.0, normalize=False, online=True)
    make_trainer(cb, epochs=2).fit(module, DataLoader(stream[0].train, batch_size=32, shuffle=True))
    w = {n: p.detach() for n, p in module.named_parameters()}
    # the cause was the float32 solve, which lost the mean (> 50 % off on the head); the core now keeps η in float64
    # and solves in float64 (tests/gaussian/test_kron_mean_precision.py), so the solved mean is the weights too
    solved = cb.server.posterior().mean
    assert max(float((solved[n] - w[n]).norm() / w[n].norm()) for n in w) < 1e-5
    for q in (cb.posterior(), cb.predictive_posterior()):
        for n, weight in w.items():
            torch.testing.assert_close(q.mean[n], weight, rtol=0, atol=0)
    # the centre survives a checkpoint round trip of the callback's state
    again = LaplaceCallback(structure="kron", lam=100.0, normalize=False, online=True)
    again.server = cb.server
    again.load_state_dict(cb.state_dict())
    assert all(torch.equal(again.posterior().mean[n], w[n]) for n in w)
    # the predictive is as accurate as the network, and separates the trained task from the untrained one
    rec = evaluate_uncertainty(module, posterior_for([cb], module), [t.test_dataloader() for t in stream], stage=0,
                               n_samples=8, max_examples=48)
    t0 = rec["tasks"][0]
    assert rec["method"] == "glm" and t0["net_accuracy"] > 0.8
    assert abs(t0["accuracy"] - t0["net_accuracy"]) <= 1 / 48 + 1e-9
    assert rec["auroc_epistemic"] > 0.75
