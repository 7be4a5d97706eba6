import logging
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from bayescl import ClassifierModule, MultiHeadMLP, synthetic_stream
from bayescl.gaussian.diag import diag_gaussian_kl
from bayescl.lightning.vcl import VCLCallback
from bayescl.methods.variational import BayesLinear, layer_posterior

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
pytestmark = [pytest.mark.filterwarnings("ignore:.*val_dataloader.*"),
              pytest.mark.filterwarnings("ignore:.*Checkpoint directory.*")]


def _stream(n_train=48, num_tasks=3):
    return synthetic_stream(num_tasks, n_train=n_train, n_test=32, seed=0)


@pytest.fixture(scope="session")
def make_module(small_model):
    """``make_module(num_tasks=3, seed=0, dtype=torch.float32)``: a ClassifierModule over a seeded (8, 8) MLP."""

    def make_module(num_tasks=3, seed=0, dtype=torch.float32):
        return ClassifierModule(small_model(hidden=(8, 8), num_tasks=num_tasks, seed=seed), num_tasks=num_tasks,
                                lr=1e-2).to(dtype)

    return make_module


def _loader(ds, dtype=torch.float32):
    return DataLoader(ds, batch_size=16, shuffle=False)


@pytest.fixture(scope="session")
def fit_task(make_trainer):
    """``fit_task(cb, module, task, epochs=1, **kw)``: one task's training with the callback's own task data."""

    def fit_task(cb, module, task, epochs=1, **kw):
        data = cb.prepare_task_data(task.train)
        make_trainer(cb, epochs, **kw).fit(module, _loader(data))

    return fit_task


def _assert_gaussians_close(a, b, names=None, rtol=1e-5, atol=1e-6):
    for n in names or a.names:
        assert torch.allclose(a.eta[n], b.eta[n], rtol=rtol, atol=atol), n
        assert torch.allclose(a.precision[n], b.precision[n], rtol=rtol, atol=atol), n


def test_swap_at_setup_idempotent_and_optimizer_sees_new_params(make_module, fit_task):
    s = _stream()
    module = make_module()
    cb = VCLCallback(ml_init=False, test_samples=2)
    fit_task(cb, module, s[0])
    layer = module.model.trunk[1]
    assert isinstance(layer, BayesLinear) and isinstance(module.model.heads[2], BayesLinear)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    ids = [id(p) for p in module.parameters()]
    fit_task(cb, module, s[1])
    assert [id(p) for p in module.parameters()] == ids  # second setup left the layers as they were
    after = dict(module.named_parameters())
    assert not torch.equal(before["model.trunk.1.weight_mu"], after["model.trunk.1.weight_mu"])
    assert not torch.equal(before["model.trunk.1.weight_logvar"], after["model.trunk.1.weight_logvar"])
    assert not torch.equal(before["model.heads.1.weight_mu"], after["model.heads.1.weight_mu"])
    # the head of task 2 was never used: untouched, and its posterior is the base prior N(0, 1)
    assert torch.equal(before["model.heads.2.weight_mu"], after["model.heads.2.weight_mu"])
    q = cb.posterior()
    assert torch.equal(q.precision["model.heads.2.weight"], torch.ones(2, 8))
    assert torch.equal(q.eta["model.heads.2.weight"], torch.zeros(2, 8))
    assert cb.tasks_seen == 2 and cb.server.names == ("task-0", "task-1")


def test_posterior_after_task_is_the_layers_q_and_sites_multiply_to_it(make_trainer, make_module):
    s = _stream()
    module = make_module(dtype=torch.float64)
    cb = VCLCallback(ml_init=False, auto_end_task=False, test_samples=2)
    trainer = make_trainer(cb, 2, double=True)
    trainer.fit(module, _loader(s[0].train))
    assert "vcl/kl" in trainer.callback_metrics
    q_layers = layer_posterior(module)
    q = cb.end_task(trainer, module)
    trained = [n for n in q.names if "heads.1" not in n and "heads.2" not in n]
    _assert_gaussians_close(q, q_layers, trained, rtol=1e-10, atol=1e-10)
    prior = cb.server.prior
    _assert_gaussians_close(q, prior * cb.server["task-0"], rtol=1e-12, atol=1e-12)
    # the layers hold the posterior after the task
    _assert_gaussians_close(layer_posterior(module), q, trained, rtol=1e-10, atol=1e-10)
    # second task: the site is q_1 / q_0
    trainer = make_trainer(cb, 1, double=True)
    trainer.fit(module, _loader(s[1].train))
    q0 = cb.posterior()
    q1 = cb.end_task(trainer, module)
    _assert_gaussians_close(q1, q0 * cb.server["task-1"], rtol=1e-9, atol=1e-9)
    # no clamp: the posterior is the fitted q_1 itself, also where it is wider than q_0 (a signed site)
    _assert_gaussians_close(q1, layer_posterior(module), trained, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("clamp", [False, True])
def test_clamp_variance_keeps_sites_non_negative(make_trainer, make_module, fit_task, clamp):
    s = _stream()
    module = make_module(dtype=torch.float64)
    cb = VCLCallback(ml_init=False, test_samples=2, clamp_variance=clamp)
    fit_task(cb, module, s[0], double=True)
    q0 = cb.posterior()
    cb.auto_end_task = False
    trainer = make_trainer(cb, 1, double=True)
    trainer.fit(module, _loader(s[1].train))
    # widen a few variances of the shared layer beyond q_0 before the second task ends
    with torch.no_grad():
        cb.layers(module)["model.trunk.1"].weight_logvar[:2] += 3.0
    cb.end_task(trainer, module)
    site = cb.server["task-1"].precision["model.trunk.1.weight"]
    q1 = cb.posterior()
    if clamp:
        assert bool((site >= 0).all())
        assert bool((q1.precision["model.trunk.1.weight"] >= q0.precision["model.trunk.1.weight"]).all())
    else:
        assert bool((site < 0).any()) and cb.server["task-1"].is_signed
        # the widened variances survive as they were fitted
        assert bool((q1.precision["model.trunk.1.weight"][:2] < q0.precision["model.trunk.1.weight"][:2]).any())
        _assert_gaussians_close(q1, cb.server.prior * cb.server["task-0"] * cb.server["task-1"],
                                rtol=1e-9, atol=1e-9)


def test_kl_gradient_is_added_once_scaled_by_n(make_module, tmp_path):
    s = _stream()
    module = make_module(dtype=torch.float64)
    cb = VCLCallback(ml_init=False)
    cb.setup(None, module, "fit")
    cb.num_examples = 48
    x, y, t = next(iter(_loader(s[0].train)))
    x = x.double()
    F.cross_entropy(module(x, t), y).backward()
    data_grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    kl = cb.add_prior_grad(module)
    prior_mean = torch.zeros(8, 784, dtype=torch.float64)
    prior_prec = torch.ones(8, 784, dtype=torch.float64)
    mu, lv = module.model.trunk[1].weight_mu, module.model.trunk[1].weight_logvar
    gm, gl = torch.autograd.grad(diag_gaussian_kl(mu, lv, prior_mean, prior_prec), (mu, lv))
    assert torch.allclose(mu.grad - data_grads["model.trunk.1.weight_mu"], gm / 48)
    assert torch.allclose(lv.grad - data_grads["model.trunk.1.weight_logvar"], gl / 48)
    # heads 1 and 2 got no data gradient: no KL gradient either
    assert "model.heads.1.weight_mu" not in data_grads and module.model.heads[1].weight_mu.grad is None
    expected = sum(diag_gaussian_kl(m.weight_mu, m.weight_logvar, 0.0 * m.weight_mu, 1.0 + 0 * m.weight_mu)
                   + diag_gaussian_kl(m.bias_mu, m.bias_logvar, 0.0 * m.bias_mu, 1.0 + 0 * m.bias_mu)
                   for m in (module.model.trunk[1], module.model.trunk[3], module.model.heads[0]))
    assert torch.allclose(kl, expected.detach())


def test_ml_init_first_epochs_are_deterministic(make_trainer, make_module):
    s = _stream()
    module = make_module()
    cb = VCLCallback(ml_init=True, ml_epochs=1, test_samples=2, logvar_init=-6.0)  # a constant, to compare with
    seen = []

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(pl_module.model.trunk[1].stochastic)

    trainer = make_trainer(cb, 1, extra=[Probe()])
    trainer.fit(module, _loader(s[0].train))
    assert seen == [False]
    assert bool((module.model.trunk[1].weight_logvar == -6.0).all())  # no noise, no KL: log-variances untouched
    assert "vcl/kl" not in trainer.callback_metrics
    assert module.model.trunk[1].stochastic  # sampling again after the fit
    module2 = make_module()
    seen.clear()
    make_trainer(VCLCallback(ml_init=True, ml_epochs=1, test_samples=2, logvar_init=-6.0), 2, extra=[Probe()]).fit(
        module2, _loader(s[0].train))
    assert seen == [False, True]
    assert not bool((module2.model.trunk[1].weight_logvar == -6.0).all())


def test_forget_gives_back_the_earlier_posterior(make_module, fit_task):
    s = _stream()
    module = make_module(dtype=torch.float64)
    cb = VCLCallback(ml_init=False, test_samples=2)
    fit_task(cb, module, s[0], double=True)
    q0 = cb.posterior()
    fit_task(cb, module, s[1], double=True)
    assert not torch.allclose(cb.posterior().eta["model.trunk.1.weight"], q0.eta["model.trunk.1.weight"])
    cb.forget(1, module)
    _assert_gaussians_close(cb.posterior(), q0, rtol=1e-9, atol=1e-9)
    _assert_gaussians_close(layer_posterior(module), q0, ["model.trunk.1.weight", "model.heads.0.bias"],
                            rtol=1e-9, atol=1e-9)
    with pytest.raises(KeyError, match="task-1"):
        cb.forget(1)


def test_non_finite_kl_raises_and_keeps_posterior(make_trainer, make_module, fit_task):
    s = _stream()
    module = make_module()
    cb = VCLCallback(ml_init=False, test_samples=2)
    fit_task(cb, module, s[0])
    q0 = cb.posterior()

    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                pl_module.model.trunk[3].weight_logvar[0, 0] = float("nan")

    with pytest.raises(ValueError, match="not finite.*model.trunk.3.weight"):
        make_trainer(cb, 1, extra=[Poison()]).fit(module, _loader(s[1].train))
    assert cb.server.names == ("task-0",)
    _assert_gaussians_close(cb.posterior(), q0, rtol=0, atol=0)
    # end_task on a non-finite q refuses too
    cb._touched.add("model.trunk.3.weight")
    with pytest.raises(ValueError, match="model.trunk.3.weight"):
        cb.end_task(None, module)
    assert cb.server.names == ("task-0",)
    cb.apply_posterior(module)
    assert bool(torch.isfinite(module.model.trunk[3].weight_logvar).all())


def test_kl_value_at_logging_steps_only_and_divergence_still_stops_the_epoch(make_trainer, make_module):
    """Between logging steps only the KL's gradient is added (its value costs two passes more); a NaN that appears
    mid-epoch is still refused by the KL's own check, at the next logging step, not only when the task closes."""
    s = _stream(n_train=160)
    module = make_module()
    cb = VCLCallback(ml_init=False, test_samples=2)
    values = []
    add = cb.add_prior_grad
    cb.add_prior_grad = lambda *a, **k: (values.append(k.get("value")), add(*a, **k))[1]

    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                with torch.no_grad():
                    pl_module.model.trunk[3].weight_logvar[0, 0] = float("nan")

    trainer = make_trainer(cb, 2, extra=[Poison()], log_every_n_steps=4)
    with pytest.raises(ValueError, match="KL term is not finite.*model.trunk.3.weight"):
        trainer.fit(module, _loader(s[0].train))
    # epoch 0: steps 0..9, the value at steps 0, 4, 8; epoch 1: step 10 (its first), then 11 (no), 12 (raises)
    assert values == [True, False, False, False, True, False, False, False, True, False, True, False, True]
    assert "vcl/kl" in trainer.callback_metrics and cb.server is not None and cb.server.names == ()


def test_accumulated_gradients_get_one_kl_term_per_optimizer_step_value_or_not(make_trainer, make_module):
    """Under ``accumulate_grad_batches`` the KL gradient is added once per optimizer step, the same closed form
    whether the step also computes the KL's value (logging steps, each epoch's first) or not."""
    s = _stream(n_train=96)
    module = make_module()
    cb = VCLCallback(ml_init=False, test_samples=2)
    values, terms = [], []
    add = cb.add_prior_grad
    cb.add_prior_grad = lambda *a, **k: (values.append(k.get("value")), add(*a, **k))[1]
    before = {}

    class Before(pl.Callback):  # the accumulated data gradient, before bayescl's term
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            layer = pl_module.model.trunk[1]  # the variational layer swapped in at setup
            before["g"] = (layer.weight_mu.grad.clone(), layer.weight_logvar.grad.clone())

    class After(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            mu, lv = pl_module.model.trunk[1].weight_mu, pl_module.model.trunk[1].weight_logvar
            gm, gl = torch.autograd.grad(diag_gaussian_kl(mu, lv, torch.zeros_like(mu), torch.ones_like(mu)), (mu, lv))
            terms.append((mu.grad - before["g"][0], lv.grad - before["g"][1], gm / 96, gl / 96))

    trainer = make_trainer(cb, 2, extra=[After()], accumulate_grad_batches=3, log_every_n_steps=3)
    trainer.callbacks.insert(0, Before())
    trainer.fit(module, _loader(s[0].train))  # 6 batches an epoch, 2 optimizer steps an epoch
    assert trainer.global_step == 4 and values == [True, False, True, True]  # steps 0, 1 | 2 (epoch start), 3
    assert len(terms) == 4
    for got_mu, got_lv, want_mu, want_lv in terms:
        torch.testing.assert_close(got_mu, want_mu)
        torch.testing.assert_close(got_lv, want_lv)


@pytest.mark.parametrize("vectorize", [True, False])
def test_train_samples_averages_the_step_and_unwraps(fit_task, vectorize):
    s = _stream()
    calls = []

    class Counting(ClassifierModule):
        def training_step(self, batch, batch_idx):
            calls.append((batch_idx, len(batch[0])))
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    module = Counting(MultiHeadMLP(hidden=(8,), num_tasks=3), num_tasks=3)
    cb = VCLCallback(ml_init=True, ml_epochs=1, train_samples=3, test_samples=2, vectorize_samples=vectorize)
    fit_task(cb, module, s[0], epochs=2)
    # epoch 0 is the deterministic maximum-likelihood fit: one plain call per batch
    assert calls[:3] == [(0, 16), (1, 16), (2, 16)]
    if vectorize:  # one call on the batch repeated 3 times
        assert calls[3:] == [(0, 48), (1, 48), (2, 48)]
    else:
        assert calls[3:] == [(0, 16)] * 3 + [(1, 16)] * 3 + [(2, 16)] * 3
    assert "training_step" not in vars(module)
    assert all(layer.tiles == 1 for layer in cb.layers(module).values())


def test_coreset_held_out_finetuned_for_test_and_restored(make_trainer, make_module):
    s = _stream(n_train=48, num_tasks=2)
    module = make_module(num_tasks=2)
    cb = VCLCallback(ml_init=False, coreset_size=8, coreset_method="kcenter", coreset_epochs=3, test_samples=3)
    train = cb.prepare_task_data(s[0].train)
    assert len(train) == 40 and sorted(cb.coresets) == [0] and cb.coresets[0][0].shape == (8, 1, 28, 28)
    trainer = make_trainer(cb, 1)
    trainer.fit(module, _loader(train))
    q = cb.posterior()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    seen = {}

    class Probe(pl.Callback):
        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["mu"] = pl_module.model.trunk[1].weight_mu.detach().clone()

    make_trainer(cb, 1, extra=[Probe()]).test(module, [t.test_dataloader() for t in s], verbose=False)
    assert not torch.equal(seen["mu"], before["model.trunk.1.weight_mu"])  # fine-tuned copy used for testing
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]), n  # restored after the test
    _assert_gaussians_close(cb.posterior(), q, rtol=0, atol=0)  # not carried forward
    with pytest.raises(ValueError, match="coreset_size=8"):
        cb.prepare_task_data(torch.utils.data.Subset(s[1].train, range(8)))


def test_coreset_per_task_finetunes_each_task_on_its_own_coreset(make_trainer, make_module, fit_task):
    s = _stream(n_train=48, num_tasks=2)
    module = make_module(num_tasks=2)
    cb = VCLCallback(ml_init=False, coreset_size=8, coreset_epochs=2, test_samples=2, coreset_per_task=True)
    for t in s:
        fit_task(cb, module, t)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    calls, seen = [], {}
    finetune = cb.coreset_finetune

    def recording(pl_module, tasks=None):
        calls.append(tasks)
        return finetune(pl_module, tasks)

    cb.coreset_finetune = recording

    class Probe(pl.Callback):
        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.setdefault(dataloader_idx, pl_module.model.trunk[1].weight_mu.detach().clone())

    make_trainer(cb, 1, extra=[Probe()]).test(module, [t.test_dataloader() for t in s], verbose=False)
    assert calls == [[0], [1]]  # once per task (two test batches each), on that task's coreset only
    # the copy used for task 1 is fine-tuned from the pre-coreset posterior, not from task 0's fine-tune
    cb.coreset_finetune = finetune
    finetune(module, [1])
    assert torch.allclose(module.model.trunk[1].weight_mu, seen[1])
    cb.restore_pre_coreset(module)
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]), n
    # batches without task ids cannot say which coreset to use
    plain = DataLoader(torch.utils.data.TensorDataset(torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="coreset_per_task=True .* must be \\(x, y, task_id\\)"):
        make_trainer(cb, 1).test(module, plain, verbose=False)
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]), n


class _Killed(Exception):
    pass


class _StopAtEpoch(pl.Callback):
    """Stops a fit at the start of an epoch, as a kill there would: nothing is committed (a fit that ends
    normally commits its task and writes its last checkpoint again with the site)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise _Killed


def test_checkpoint_resume_equals_uninterrupted(make_trainer, make_module, tmp_path):
    s = _stream(n_train=48)

    def run(stop_in_task=None, ckpt_path=None, tag="full"):
        torch.manual_seed(0)
        module = make_module()
        cb = VCLCallback(ml_init=True, ml_epochs=1, coreset_size=4, test_samples=2, train_samples=2)
        for i, task in enumerate(s):
            if ckpt_path is not None and i < 1:
                continue
            data = cb.prepare_task_data(task.train, task=i)
            ckpt = ModelCheckpoint(dirpath=tmp_path / tag / f"t{i}", save_top_k=-1, every_n_epochs=1,
                                   filename="{epoch}")
            epochs = 3 if i == 0 else 2
            trainer = make_trainer(cb, epochs, extra=[ckpt], enable_checkpointing=True)
            if stop_in_task == i:  # "killed" at the start of task i's second epoch: epoch=0.ckpt is written
                trainer = make_trainer(cb, epochs, extra=[ckpt, _StopAtEpoch(1)], enable_checkpointing=True)
                with pytest.raises(_Killed):
                    trainer.fit(module, _loader(data))
                return None
            trainer.fit(module, _loader(data), ckpt_path=ckpt_path if i == 1 else None)
        return cb

    full = run()
    assert run(stop_in_task=1, tag="killed") is None
    path = tmp_path / "killed" / "t1" / "epoch=0.ckpt"
    assert path.is_file()
    resumed = run(ckpt_path=str(path), tag="resumed")
    assert resumed.server.names == full.server.names == ("task-0", "task-1", "task-2")
    _assert_gaussians_close(resumed.posterior(), full.posterior(), rtol=1e-6, atol=1e-6)
    assert sorted(resumed.coresets) == [0, 1, 2]
    for t in range(3):
        for a, b in zip(resumed.coresets[t], full.coresets[t]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["vcl", "vcl-coreset"])
def test_recipes_build_the_callback(name):
    from bayescl.harness.recipes import load_recipe

    (cb,) = load_recipe(name).build_callbacks()
    assert isinstance(cb, VCLCallback) and cb.prior_precision == 1.0
    assert cb.logvar_init == -6.0  # the recipes' validated choices (benchmarks/results/honest)
    assert cb.coreset_size == (40 if name == "vcl-coreset" else 0)
    assert cb.train_samples == 10 and cb.vectorize_samples  # the paper's samples, in one pass



def test_invalid_params_regex_names_params():
    with pytest.raises(ValueError, match="params"):
        VCLCallback(params=["model.(trunk"])
    cb = VCLCallback(params=[r"heads\.0\."])
    assert cb.include_layer("model.heads.0") and not cb.include_layer("model.trunk.1")


def test_coreset_prepared_before_resuming_a_committed_checkpoint_is_kept(make_trainer, make_module, tmp_path):
    """The next task's coreset, held out before fit(ckpt_path=<committed checkpoint>), survives the restore."""
    s = _stream(n_train=48)
    module = make_module()
    cb = VCLCallback(ml_init=False, coreset_size=4, test_samples=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    make_trainer(cb, 1, extra=[ckpt], enable_checkpointing=True).fit(module, _loader(cb.prepare_task_data(s[0].train)))
    fresh = VCLCallback(ml_init=False, coreset_size=4, test_samples=2)  # a new process: the next task
    fresh.tasks_seen = 1  # what resume_point names; prepare_task_data uses it as the default task
    data = fresh.prepare_task_data(s[1].train)
    make_trainer(fresh, 1).fit(make_module(), _loader(data), ckpt_path=str(tmp_path / "last.ckpt"))
    assert sorted(fresh.coresets) == [0, 1] and fresh.tasks_seen == 2
    assert torch.equal(fresh.coresets[0][0], cb.coresets[0][0])


def test_fan_in_logvar_init_reaches_the_layers(make_trainer, make_module):
    """``logvar_init="fan_in:r"``: the swapped-in layers start at log(r / (3 fan_in)), each its own value."""
    import math

    module = make_module()
    cb = VCLCallback(logvar_init="fan_in:0.5", ml_init=True, ml_epochs=1, test_samples=2)
    assert cb.logvar_init == "fan_in:0.5"
    make_trainer(cb, 1).fit(module, _loader(_stream()[0].train))  # ML epoch only: log-variances untouched
    trunk = module.model.trunk
    fans = {1: trunk[1].in_features, 3: trunk[3].in_features}
    assert fans[1] != fans[3]  # two layers, two different log-variances
    for i, fan in fans.items():
        expected = torch.full_like(trunk[i].weight_logvar, math.log(0.5 / (3 * fan)))
        assert torch.allclose(trunk[i].weight_logvar, expected), i
    for bad in ("fan_out", "fan_in:0", None):
        with pytest.raises((ValueError, TypeError), match="logvar_init"):
            VCLCallback(logvar_init=bad)
