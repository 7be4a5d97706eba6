import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescl import ClassifierModule, MultiHeadMLP, synthetic_stream
from bayescl.gaussian.diag import DiagGaussian
from bayescl.lightning.laplace import LaplaceCallback


def loaders(stream, shuffle=False, bs=64):
    return [DataLoader(t.train, batch_size=bs, shuffle=shuffle) for t in stream]


class ZeroLoss(pl.LightningModule):
    """A module whose data loss has zero gradient: one SGD step moves θ by exactly −lr·(Λθ − η)/N."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)

    def training_step(self, batch, batch_idx):
        return (self.lin.weight * 0).sum() + (self.lin.bias * 0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_prior_gradient_added_once_per_optimizer_step_with_accumulation(make_trainer):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    module = ZeroLoss()
    cb = LaplaceCallback(structure="diag", fisher="exact", prior_precision=1.0)
    make_trainer(cb).fit(module, DataLoader(data, batch_size=4))  # task 0: closes a site (SGD steps on zero grad)
    post = cb.posterior()
    theta0 = {n: p.detach().clone() for n, p in module.named_parameters()}
    # perturb the weights away from the posterior mean, then run exactly one optimizer step of 2 accumulated batches
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb.auto_end_task = False
    make_trainer(cb, max_steps=1, accumulate_grad_batches=2).fit(module, DataLoader(data, batch_size=4))
    expected_grad = post.quadratic_grad(before)
    for n, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - expected_grad[n] / len(data))
        # the gradient is Λ(θ − θ*), so it vanishes at the optimum of task 0
        torch.testing.assert_close(post.quadratic_grad(theta0)[n], torch.zeros_like(p), atol=1e-5, rtol=0)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_sites_per_task_and_posterior_mean_is_last_optimum(make_trainer, small_model, structure):
    stream = synthetic_stream(num_tasks=3, n_train=128, n_test=32)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback(structure=structure, fisher="exact")
    for loader in loaders(stream)[:2]:
        make_trainer(cb).fit(module, loader)
    assert cb.server.names == ("task-0", "task-1") and cb.tasks_seen == 2
    # the posterior is centred on the last optimum: its prior gradient Λθ − η vanishes there (no solve needed)
    theta = {n: p.detach() for n, p in module.named_parameters()}
    moved = {n: t + 0.01 for n, t in theta.items()}
    g_at, g_moved = cb.posterior().quadratic_grad(theta), cb.posterior().quadratic_grad(moved)
    for n in theta:
        assert g_at[n].abs().max() <= 1e-3 * g_moved[n].abs().max() + 1e-6, n
    if structure == "diag":
        for n, t in cb.posterior().mean.items():
            torch.testing.assert_close(t, theta[n])
    # heads of tasks not trained get no curvature: their precision is the base prior's
    prec = cb.posterior().precision if structure == "diag" else None
    if prec is not None:
        assert torch.all(prec["model.heads.2.weight"] == cb.prior_precision)
        assert (prec["model.heads.0.weight"] > cb.prior_precision).float().mean() > 0.5  # dead ReLUs get none


def test_forget_latest_task_restores_previous_posterior_exactly(make_trainer, small_model):
    stream = synthetic_stream(num_tasks=3, n_train=128, n_test=32)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback(structure="diag", fisher="exact", lam=1.0, normalize=False)  # float32 tolerances: raw lam = 1
    snapshots = []
    for loader in loaders(stream):
        make_trainer(cb).fit(module, loader)
        snapshots.append(copy.deepcopy(cb.posterior()))
    cb.forget(2)
    q = cb.posterior()
    for n in q.names:
        torch.testing.assert_close(q.eta[n], snapshots[1].eta[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(q.precision[n], snapshots[1].precision[n])
    # removing a middle task removes exactly its curvature from the precision
    site1 = cb.server["task-1"]
    cb.forget("task-1")
    for n in q.names:
        torch.testing.assert_close(cb.posterior().precision[n], snapshots[1].precision[n] - site1.precision[n])
    with pytest.raises(KeyError, match="task-7"):
        cb.forget(7)


def test_online_keeps_one_site_and_gamma_decays(make_trainer, small_model):
    stream = synthetic_stream(num_tasks=3, n_train=128, n_test=32)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback(structure="diag", fisher="exact", gamma=0.5, online=True, prior_precision=1e-3)
    precs = []
    for loader in loaders(stream):
        make_trainer(cb).fit(module, loader)
        precs.append(cb.posterior().precision["model.heads.0.weight"].clone())
        assert cb.server.names == ("online",)
    # head 0 sees data only in task 0: its curvature decays by gamma at every later task
    torch.testing.assert_close(precs[1] - 1e-3, 0.5 * (precs[0] - 1e-3))
    torch.testing.assert_close(precs[2] - 1e-3, 0.25 * (precs[0] - 1e-3))
    with pytest.raises(ValueError, match="online=True"):
        cb.forget(0)


def test_checkpoint_resume_during_task_3_equals_uninterrupted(make_trainer, small_model, tmp_path):
    stream = synthetic_stream(num_tasks=3, n_train=128, n_test=32)
    lds = loaders(stream)

    def run(stop_in_task3):
        pl.seed_everything(0)
        module = ClassifierModule(small_model(), num_tasks=3)
        cb = LaplaceCallback(structure="diag", fisher="mc", seed=3)
        for i, loader in enumerate(lds):
            if i == 2 and stop_in_task3:
                t = make_trainer(cb, epochs=1)  # "killed" after 1 of 2 epochs: save, then resume from scratch objects
                cb.auto_end_task = False
                t.fit(module, loader)
                path = tmp_path / "mid.ckpt"
                t.save_checkpoint(path)
                module = ClassifierModule(small_model(), num_tasks=3)
                cb = LaplaceCallback(structure="diag", fisher="mc", seed=3)
                make_trainer(cb, epochs=2).fit(module, loader, ckpt_path=path)
            else:
                make_trainer(cb, epochs=2).fit(module, loader)
        return module, cb

    m1, c1 = run(False)
    m2, c2 = run(True)
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert c1.server.names == c2.server.names == ("task-0", "task-1", "task-2")
    for n in c1.posterior().names:
        torch.testing.assert_close(c1.posterior().eta[n], c2.posterior().eta[n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c1.posterior().precision[n], c2.posterior().precision[n], atol=1e-5, rtol=1e-4)


def test_checkpoint_from_other_architecture_names_parameter(make_trainer, small_model, tmp_path):
    stream = synthetic_stream(num_tasks=1, n_train=64, n_test=16)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback()
    t = make_trainer(cb)
    t.fit(module, loaders(stream)[0])
    t.save_checkpoint(tmp_path / "a.ckpt")
    other = ClassifierModule(MultiHeadMLP(hidden=(8,), num_tasks=3), num_tasks=3)
    cb2 = LaplaceCallback()
    cb2.ensure_server(other)
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    with pytest.raises(ValueError, match="model.trunk.1.weight"):
        cb2.on_load_checkpoint(None, other, ckpt)


def test_bad_input_and_failures_keep_posterior(make_trainer, small_model):
    with pytest.raises(ValueError, match="lam=0"):
        LaplaceCallback(lam=0)
    with pytest.raises(ValueError, match="gamma=1.5"):
        LaplaceCallback(gamma=1.5)
    with pytest.raises(ValueError, match="structure='full'"):
        LaplaceCallback(structure="full")
    with pytest.raises(ValueError, match="batch_squared"):
        LaplaceCallback(structure="kron", fisher="batch_squared")

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    with pytest.raises(ValueError, match="Linear or .*Conv2d"):
        LaplaceCallback(structure="kron").ensure_server(NoLinear())

    stream = synthetic_stream(num_tasks=2, n_train=64, n_test=16)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback(fisher="exact")
    make_trainer(cb).fit(module, loaders(stream)[0])
    before = copy.deepcopy(cb.posterior())
    with pytest.raises(ValueError, match="no batches"):
        cb.end_task(None, module, DataLoader(TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0).long(),
                                                          torch.zeros(0).long())))
    with torch.no_grad():
        module.model.trunk[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        cb.end_task(None, module, loaders(stream)[1])
    assert cb.server.names == ("task-0",)
    for n in before.names:
        torch.testing.assert_close(cb.posterior().eta[n], before.eta[n])


def test_new_head_parameters_get_base_prior(make_trainer):
    """A model that grows a head between tasks (Avalanche's multi-head classifier): no crash, base prior."""
    stream = synthetic_stream(num_tasks=2, n_train=64, n_test=16)
    model = MultiHeadMLP(hidden=(16,), num_tasks=1)
    module = ClassifierModule(model, num_tasks=2)
    cb = LaplaceCallback(fisher="exact", prior_precision=0.5)
    make_trainer(cb).fit(module, loaders(stream)[0])
    model.heads.append(nn.Linear(16, 2))
    make_trainer(cb).fit(module, loaders(stream)[1])
    post = cb.posterior()
    assert "model.heads.1.weight" in post
    assert isinstance(post, DiagGaussian) and cb.tasks_seen == 2
    assert (post.precision["model.heads.1.weight"] > 0.5).float().mean() > 0.5
    assert (post.precision["model.heads.0.weight"] > 0.5).float().mean() > 0.5


def test_low_rank_online_kron_is_centred_on_the_optimum(make_trainer, small_model):
    stream = synthetic_stream(num_tasks=2, n_train=128, n_test=32)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback(structure="kron", fisher="exact", online=True, rank=4)
    for loader in loaders(stream):
        make_trainer(cb).fit(module, loader)
    q = cb.posterior()
    assert q.terms["model.trunk.1"][0].UA.shape == (785, 4)
    theta = {n: p.detach() for n, p in module.named_parameters()}
    g_at = q.quadratic_grad(theta)
    g_moved = q.quadratic_grad({n: t + 0.01 for n, t in theta.items()})
    for n in theta:
        assert g_at[n].abs().max() <= 1e-3 * g_moved[n].abs().max() + 1e-6, n
    with pytest.raises(ValueError, match="rank=4 applies to structure='kron'"):
        LaplaceCallback(structure="diag", rank=4)


@pytest.mark.parametrize("kw", [{"structure": "diag"}, {"structure": "kron"},
                                {"structure": "kron", "online": True, "rank": 4}, {"structure": "kron", "lam": 3.0}])
def test_fused_prior_gradient_equals_quadratic_grad(make_trainer, small_model, kw):
    """The callback's fused fast path adds exactly (Λθ − η)/N to existing gradients (float64, 2 tasks)."""
    stream = synthetic_stream(num_tasks=2, n_train=96, n_test=16)
    module = ClassifierModule(small_model(), num_tasks=3).double()
    cb = LaplaceCallback(fisher="exact", prior_precision=0.3, **kw)
    for task in stream:
        data = TensorDataset(*(t.double() if t.is_floating_point() else t for t in task.train.tensors))
        make_trainer(cb).fit(module, DataLoader(data, batch_size=64))
    q = cb.posterior()
    if kw["structure"] == "kron" and not kw.get("online"):
        assert max(q.num_terms.values()) == 2  # a sum of two Kronecker terms per layer
    torch.manual_seed(1)
    theta = {}
    for n, p in module.named_parameters():
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
        p.grad = torch.randn_like(p)
        theta[n] = (p.detach().clone(), p.grad.clone())
    cb.num_examples = 7
    cb.add_prior_grad(module)
    expected = q.quadratic_grad({n: t for n, (t, _) in theta.items()})
    for n, p in module.named_parameters():
        torch.testing.assert_close(p.grad, theta[n][1] + expected[n] / 7, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_predictive_posterior_uses_the_evidence_prior_precision(make_trainer, small_model, structure):
    from bayescl.methods.marglik import fit_prior_precision, log_evidence

    stream = synthetic_stream(num_tasks=1, n_train=128, n_test=16)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback(structure=structure, fisher="exact", online=True)
    make_trainer(cb).fit(module, loaders(stream)[0])
    q, qp = cb.posterior(), cb.predictive_posterior()
    tau = cb.fitted_prior_precision
    assert tau == pytest.approx(fit_prior_precision(q, 1e-4)) and tau > 1e-2
    assert float(log_evidence(q, tau, 1e-4)[0]) > float(log_evidence(q, 1e-4, 1e-4)[0])
    assert cb.predictive_posterior() is qp  # cached per posterior
    for n in q.names:
        torch.testing.assert_close(qp.mean[n], q.mean[n], rtol=1e-4, atol=1e-5)
    if structure == "diag":
        torch.testing.assert_close(qp.precision["model.trunk.1.weight"],
                                   q.precision["model.trunk.1.weight"] - 1e-4 + tau)
    assert LaplaceCallback(predictive_prior_precision="train").predictive_prior_precision == "train"
    with pytest.raises(ValueError, match="predictive_prior_precision='nope' is not valid"):
        LaplaceCallback(predictive_prior_precision="nope")
    with pytest.raises(ValueError, match="predictive_prior_precision"):
        LaplaceCallback(predictive_prior_precision=-1.0)


@pytest.mark.parametrize("online", [False, True])
def test_end_task_failing_after_gamma_tempering_rolls_back_bit_for_bit(assert_bitwise_equal, make_trainer, small_model, online):
    """A failure after the earlier sites were tempered by gamma (a site name that exists; an online merge that
    raises) leaves the server exactly as it was: the rollback in end_task restores the untempered sites."""
    import dataclasses

    stream = synthetic_stream(num_tasks=2, n_train=64, n_test=16)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback(fisher="exact", gamma=0.5, online=online)
    make_trainer(cb).fit(module, loaders(stream)[0])
    before = copy.deepcopy(cb.server.state_dict())
    q_before = copy.deepcopy(cb.posterior())
    if online:
        def broken_merge(q):
            raise RuntimeError("merge failed")

        cb.builders = dataclasses.replace(cb.builders, merge=broken_merge)
        with pytest.raises(RuntimeError, match="merge failed"):
            cb.end_task(None, module, loaders(stream)[1])
    else:
        with pytest.raises(KeyError, match="task-0"):
            cb.end_task(None, module, loaders(stream)[1], name="task-0")
    assert_bitwise_equal(cb.server.state_dict(), before)
    assert_bitwise_equal(cb.posterior().state_dict(), q_before.state_dict())
    assert cb.tasks_seen == 1


def test_invalid_params_regex_names_params():
    with pytest.raises(ValueError, match="params"):
        LaplaceCallback(params=["model.(trunk"])
    with pytest.raises(TypeError, match="params"):
        LaplaceCallback(params="model.trunk")


def test_kron_site_and_prior_cover_the_selected_parameters_only(make_trainer, small_model):
    """With ``params`` the kron prior and every site are over the selected parameters; a layer whose bias is not
    selected is a Kronecker block of its weight alone."""
    stream = synthetic_stream(num_tasks=1, n_train=64, n_test=16)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback(structure="kron", fisher="exact", params=[r"trunk\.1\.weight", r"heads\.0\."])
    make_trainer(cb).fit(module, loaders(stream)[0])
    q = cb.posterior()
    assert set(q.names) == {"model.trunk.1.weight", "model.heads.0.weight", "model.heads.0.bias"}
    assert q.layers["model.trunk.1"] == ("model.trunk.1.weight", None)
    A, G = q.terms["model.trunk.1"][-1].A, q.terms["model.trunk.1"][-1].G
    assert A.shape == (module.model.trunk[1].in_features,) * 2 and G.shape == (16, 16)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_normalize_makes_lam_each_sites_mean_precision_per_example(make_trainer, small_model, structure):
    from bayescl.gaussian import mean_precision

    stream = synthetic_stream(num_tasks=2, n_train=128, n_test=32)
    torch.manual_seed(0)
    base = ClassifierModule(small_model(), num_tasks=2)
    runs = {}
    for normalize in (False, True):
        module = copy.deepcopy(base)
        cb = LaplaceCallback(structure=structure, fisher="exact", lam=7.0, normalize=normalize)
        for loader in loaders(stream):
            make_trainer(cb).fit(module, loader)
        runs[normalize] = cb
    n = len(stream[0].train)
    assert runs[True].num_examples == n == len(stream[1].train)
    for name in ("task-0", "task-1"):  # mean precision per weight: lam per training example
        assert mean_precision(runs[True].server[name]) == pytest.approx(7.0 * n, rel=1e-5)
    # task 0 trains the same weights either way (no prior yet), so its curvature S = Σ_n F_n is the same, only
    # rescaled: raw = 7 S, normalised = 7 S / mean(S / N)
    raw, site = runs[False].server["task-0"], runs[True].server["task-0"]
    ratio = mean_precision(raw) / (7.0 * n)
    assert ratio != pytest.approx(1.0, rel=0.1)
    for k, d in site.precision_diagonal().items():
        torch.testing.assert_close(d * ratio, raw.precision_diagonal()[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="normalize"):
        LaplaceCallback(normalize="yes")


def test_normalize_warns_when_the_task_has_no_curvature(make_trainer, small_model):
    stream = synthetic_stream(num_tasks=3, n_train=64, n_test=16)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = LaplaceCallback(fisher="exact", normalize=True, params=[r"heads\.2\."])  # a head task 0 never uses
    with pytest.warns(UserWarning, match="nothing to normalise"):
        make_trainer(cb).fit(module, loaders(stream)[0])
    assert cb.tasks_seen == 1
