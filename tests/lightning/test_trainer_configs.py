"""The callbacks dropped into the Trainer configurations users have (docs/trainer-configurations.md).

Each test runs a real Lightning Trainer on a tiny module (4 inputs, 8 hidden units, 16 examples) so that every
test takes seconds on a CPU.
"""

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from bayescl import ClassifierModule, LaplaceCallback, VCLCallback, synthetic_stream
from bayescl.gaussian.diag import diag_gaussian_kl
from bayescl.lightning.base import check_server_params

N = 16  # training examples per task
BS = 8  # batch size: N // BS optimizer steps per epoch


# ------------------------------------------------------------------------------ helpers
class Tiny(pl.LightningModule):
    """Linear(4, 8) - [BatchNorm1d] - ReLU - Linear(8, 2), cross-entropy, SGD."""

    def __init__(self, bn: bool = False, hidden: int = 8, lr: float = 0.05):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, hidden), *([nn.BatchNorm1d(hidden)] if bn else []), nn.ReLU(),
                                 nn.Linear(hidden, 2))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def task_data(task: int, n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(task)
    return TensorDataset(torch.randn(n, 4, generator=g) + task, torch.randint(0, 2, (n,), generator=g))


def loader(task: int, n: int = N, bs: int = BS) -> DataLoader:
    return DataLoader(task_data(task, n), batch_size=bs)


def snapshot(cb) -> dict:
    return copy.deepcopy(cb.server.state_dict())


def bayescl_warnings(record, text: str) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("bayescl") and text in str(w.message)]


class StepCounter(pl.Callback):
    """Counts the optimizer steps of the fits it sees."""

    def __init__(self):
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1


class GradAfterCallbacks(pl.Callback):
    """Records the gradients as the optimizer will see them (after every earlier callback's hook)."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def dense_term(cb, module) -> dict[str, torch.Tensor]:
    """(Λθ − η) / N_t at the current weights, from the dense posterior."""
    q = cb.posterior()
    theta = {n: p.detach().clone() for n, p in module.named_parameters() if n in q.eta}
    return {n: g * cb.prior_term_scale() for n, g in q.quadratic_grad(theta).items()}


def assert_term_close(added: torch.Tensor, term: torch.Tensor, scale: float, msg: str | None = None) -> None:
    """``added == term`` up to the float32 rounding of the fused ``(Λθ − η) / N``, whose cancellation error is
    about ``ε₃₂ |Λθ| / N``: ``scale`` (:func:`cancellation_scale`). 1e-6 of it is 16 ε₃₂."""
    torch.testing.assert_close(added, term, rtol=1.3e-6, atol=max(1e-5, 1e-6 * scale), msg=msg)


def cancellation_scale(cb, module) -> dict[str, float]:
    """``max |diag(Λ) ⊙ θ| / N_t`` per parameter: the size of the two terms the fused prior gradient subtracts."""
    diag = cb.posterior().precision_diagonal()
    return {n: float((diag[n] * p.detach().abs()).max()) * cb.prior_term_scale()
            for n, p in module.named_parameters() if n in diag}


# ------------------------------------------------------------------------------ 1. new / reused Trainer
def test_readme_example_new_trainer_per_task_gives_one_site_per_task(make_trainer, small_model):
    stream = synthetic_stream(num_tasks=2, n_train=32, n_test=8)
    model = ClassifierModule(small_model(hidden=(8,), num_tasks=2), num_tasks=2)
    laplace = LaplaceCallback(structure="diag")
    for task in stream:
        trainer = make_trainer(laplace)
        trainer.fit(model, task.train_dataloader(batch_size=16))
    assert list(laplace.server.names) == ["task-0", "task-1"] and laplace.tasks_seen == 2


def test_reused_trainer_trains_every_task_and_warns_once(make_trainer):
    module, cb = Tiny(), LaplaceCallback(structure="diag")
    trainer = make_trainer(cb)
    steps = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for t in range(3):
            trainer.fit(module, loader(t))
            steps.append(trainer.global_step)
    assert steps == [2, 4, 6]
    assert list(cb.server.names) == ["task-0", "task-1", "task-2"]
    assert len(bayescl_warnings(rec, "max_epochs is raised")) == 1


# ------------------------------------------------------------------------------ 2. fits that train nothing
class Boom(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("boom")


def _empty_loader():
    return DataLoader(TensorDataset(torch.empty(0, 4), torch.empty(0, dtype=torch.long)), batch_size=BS)


@pytest.mark.parametrize("case", ["fast_dev_run", "limit_train_batches=0", "empty loader", "raises mid-epoch"])
def test_fit_that_trains_nothing_keeps_posterior_bit_for_bit_and_warns_once(assert_bitwise_equal, make_trainer, case):
    module, cb = Tiny(), LaplaceCallback(structure="diag")
    make_trainer(cb).fit(module, loader(0))
    before = snapshot(cb)
    kw, extra, data = {}, (), loader(1)
    if case == "fast_dev_run":
        kw["fast_dev_run"] = True
    elif case == "limit_train_batches=0":
        kw["limit_train_batches"] = 0
    elif case == "empty loader":
        data = _empty_loader()
    else:
        extra = (Boom(),)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            trainer = make_trainer(cb, extra=extra, **kw)
            if case == "raises mid-epoch":
                with pytest.raises(RuntimeError, match="boom"):
                    trainer.fit(module, data)
            else:
                trainer.fit(module, data)
    assert_bitwise_equal(snapshot(cb), before)
    assert cb.tasks_seen == 1
    assert len(bayescl_warnings(rec, "not committed")) == 1, [str(w.message) for w in rec]


def test_end_task_by_hand_after_the_automatic_commit_raises(assert_bitwise_equal, make_trainer):
    module, cb = Tiny(), LaplaceCallback(structure="diag")
    trainer = make_trainer(cb)
    trainer.fit(module, loader(0))
    before = snapshot(cb)
    with pytest.raises(ValueError, match="already committed"):
        cb.end_task(trainer, module)
    assert_bitwise_equal(snapshot(cb), before)


# ------------------------------------------------------------------------------ 3. gradient accumulation
def test_accumulated_gradients_get_one_prior_term_per_optimizer_step(make_trainer):
    module, cb = Tiny(), LaplaceCallback(structure="diag")
    make_trainer(cb).fit(module, loader(0))
    calls = []
    add = cb.add_prior_grad
    cb.add_prior_grad = lambda *a, **k: (calls.append(1), add(*a, **k))[1]
    spy = GradAfterCallbacks()
    pre = {}

    class Before(pl.Callback):  # the accumulated data gradient, before bayescl's term
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pre[len(spy.grads)] = ({n: p.grad.clone() for n, p in pl_module.named_parameters()},
                                   dense_term(cb, pl_module), cancellation_scale(cb, pl_module))

    trainer = make_trainer(cb, extra=(spy,), accumulate_grad_batches=3)
    trainer.callbacks.insert(0, Before())
    trainer.fit(module, loader(1, n=24, bs=4))  # 6 batches, 2 optimizer steps
    assert len(calls) == 2 and trainer.global_step == 2 and len(spy.grads) == 2
    for i, after in enumerate(spy.grads):
        data_grad, term, scale = pre[i]
        for n in term:
            assert_term_close(after[n] - data_grad[n], term[n], scale[n])


# ------------------------------------------------------------------------------ 4. bf16-mixed on CPU
@pytest.mark.parametrize("make_cb", [lambda: LaplaceCallback(structure="diag"),
                                     lambda: VCLCallback(test_samples=2)], ids=["diag", "vcl"])
def test_bf16_mixed_on_cpu_two_tasks_finite_posterior(make_trainer, make_cb):
    module, cb = Tiny(), make_cb()
    for t in range(2):
        make_trainer(cb, precision="bf16-mixed").fit(module, loader(t))
    q = cb.posterior()
    assert cb.tasks_seen == 2 and len(cb.server) == 2
    assert all(bool(torch.isfinite(v).all()) for v in q.eta.values())
    assert all(bool(torch.isfinite(v).all()) for v in q.mean.values())


# ------------------------------------------------------------------------------ 5. manual optimization, 2 optimizers
class TwoOptimizers(Tiny):
    """Manual optimization: the first layer under one SGD, the second under another; each step's gradients are
    recorded after backward (``before``) and as the optimizer sees them (``after``, in the module's hook, which runs
    after the callbacks')."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.records: list[tuple[int, dict, dict]] = []
        self._before: dict = {}
        self.cb = None

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        for o in opts:
            o.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        self._before = {n: p.grad.clone() for n, p in self.named_parameters()}
        for i, o in enumerate(opts):
            self._which = i
            o.step()

    def on_before_optimizer_step(self, optimizer):
        if self.cb is not None and self.cb.tasks_seen > 0:
            after = {n: p.grad.clone() for n, p in self.named_parameters()}
            self.records.append((self._which, after, self._before))
            self._before = after

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[0].parameters(), lr=self.lr),
                torch.optim.SGD(self.net[2].parameters(), lr=self.lr))


def dense_kl_term(cb, module) -> dict[str, torch.Tensor]:
    """VCL's ∇KL(q || q_{t-1}) / N_t at the current variational parameters, by autograd of the closed form."""
    prior = cb.posterior()
    out = {}
    for path in ("net.0", "net.2"):
        layer = module.get_submodule(path)
        for k in ("weight", "bias"):
            mu, lv = (getattr(layer, f"{k}_{s}").detach().clone().requires_grad_(True) for s in ("mu", "logvar"))
            kl = diag_gaussian_kl(mu, lv, prior.mean[f"{path}.{k}"], prior.precision[f"{path}.{k}"])
            g_mu, g_lv = torch.autograd.grad(kl, (mu, lv))
            out[f"{path}.{k}_mu"], out[f"{path}.{k}_logvar"] = g_mu * cb.prior_term_scale(), g_lv * cb.prior_term_scale()
    return out


@pytest.mark.parametrize("method", ["laplace", "vcl"])
def test_manual_optimization_two_optimizers_one_term_per_parameter_per_step(make_trainer, method):
    """Each optimizer's step adds the term of the parameters it holds, once; VCL's optimizers hold each layer's
    means and log-variances (the layers are swapped in before ``configure_optimizers``)."""
    module = TwoOptimizers()
    cb = LaplaceCallback(structure="diag") if method == "laplace" else VCLCallback(ml_init=False, test_samples=2)
    module.cb = cb
    make_trainer(cb).fit(module, loader(0))
    term_at, scales = [], []

    class Term(pl.Callback):  # the dense term at the weights the step sees
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            term_at.append((dense_term if method == "laplace" else dense_kl_term)(cb, pl_module))
            scales.append(cancellation_scale(cb, pl_module) if method == "laplace" else {})

    trainer = make_trainer(cb)
    trainer.callbacks.insert(0, Term())
    trainer.fit(module, loader(1))
    assert len(module.records) == 4  # 2 batches x 2 optimizers
    owner = {n: (0 if n.startswith("net.0.") else 1) for n, _ in module.named_parameters()}
    for (which, after, before), term, scale in zip(module.records, term_at, scales):
        for n in after:
            expected = term[n] if owner[n] == which else torch.zeros_like(term[n])
            assert_term_close(after[n] - before[n], expected, scale.get(n, 0.0), msg=f"{n} at optimizer {which}")
    assert set(module.records[0][1]) == set(term_at[0])  # every parameter compared
    assert all(float(t.abs().max()) > 0 for t in term_at[-1].values())  # zero at the first step: q = q_{t-1}
    assert list(cb.server.names) == ["task-0", "task-1"]


# ------------------------------------------------------------------------------ 6. IterableDataset without __len__
class Stream(IterableDataset):
    def __init__(self, task: int):
        self.data = task_data(task)

    def __iter__(self):
        return iter(self.data)


def test_iterable_dataset_needs_num_examples(make_trainer):
    module, cb = Tiny(), LaplaceCallback(structure="diag")
    steps = StepCounter()
    with pytest.raises(ValueError, match="num_examples"):
        make_trainer(cb, extra=(steps,)).fit(module, DataLoader(Stream(0), batch_size=BS))
    assert steps.steps == 0 and len(cb.server) == 0

    cb = LaplaceCallback(structure="diag", num_examples=N)
    for t in range(2):
        make_trainer(cb, extra=(steps,)).fit(module, DataLoader(Stream(t), batch_size=BS))
    assert steps.steps == 4 and list(cb.server.names) == ["task-0", "task-1"]
    assert cb.num_examples == N and cb.prior_term_scale() == pytest.approx(1 / N)


# ------------------------------------------------------------------------------ 7. import lightning as L
def test_lightning_package_trainer_and_module():
    L = pytest.importorskip("lightning")

    class LTiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def l_trainer(cb):
        return L.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    for cb in (LaplaceCallback(structure="diag"), VCLCallback(test_samples=2)):
        module = LTiny()
        for t in range(2):  # a new L.Trainer per task
            trainer = l_trainer(cb)
            trainer.fit(module, loader(t))
            assert trainer.global_step == 2
        reused = l_trainer(cb)  # then one L.Trainer for two more tasks
        reused.fit(module, loader(2))
        with pytest.warns(UserWarning, match="max_epochs is raised"):
            reused.fit(module, loader(3))
        assert reused.global_step == 4
        assert list(cb.server.names) == [f"task-{t}" for t in range(4)], type(cb).__name__


# ------------------------------------------------------------------------------ 8. two posterior callbacks
def test_laplace_and_vcl_on_one_trainer_refused_in_setup(assert_bitwise_equal, make_trainer):
    module, lap = Tiny(), LaplaceCallback(structure="diag")
    make_trainer(lap).fit(module, loader(0))
    before, steps = snapshot(lap), StepCounter()
    with pytest.raises(ValueError, match="one posterior callback per Trainer"):
        make_trainer(lap, extra=(VCLCallback(), steps)).fit(module, loader(1))
    assert steps.steps == 0
    assert_bitwise_equal(snapshot(lap), before)


def test_diag_and_kron_on_the_same_parameters_refused(make_trainer):
    steps = StepCounter()
    cbs = (LaplaceCallback(structure="diag"), LaplaceCallback(structure="kron"))
    with pytest.raises(ValueError, match=r"params=.*state_key_suffix"):
        make_trainer(cbs[0], extra=(cbs[1], steps)).fit(Tiny(), loader(0))
    assert steps.steps == 0


def test_two_callbacks_on_disjoint_parameters_each_add_their_term(make_trainer):
    module = Tiny()
    first = LaplaceCallback(structure="diag", params=[r"^net\.0\."], state_key_suffix="first")
    second = LaplaceCallback(structure="kron", params=[r"^net\.2\."], state_key_suffix="second")
    make_trainer(first, extra=(second,)).fit(module, loader(0))
    assert list(first.server.names) == list(second.server.names) == ["task-0"]
    assert set(first.posterior().eta) == {"net.0.weight", "net.0.bias"}
    assert set(second.posterior().eta) == {"net.2.weight", "net.2.bias"}
    spy, pre = GradAfterCallbacks(), []

    class Before(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pre.append(({n: p.grad.clone() for n, p in pl_module.named_parameters()},
                        {**dense_term(first, pl_module), **dense_term(second, pl_module)},
                        {**cancellation_scale(first, pl_module), **cancellation_scale(second, pl_module)}))

    trainer = make_trainer(first, extra=(second, spy))
    trainer.callbacks.insert(0, Before())
    trainer.fit(module, loader(1))
    assert len(spy.grads) == 2
    for after, (data_grad, term, scale) in zip(spy.grads, pre):
        assert set(term) == set(after)
        for n in term:
            assert_term_close(after[n] - data_grad[n], term[n], scale[n], msg=n)


# ------------------------------------------------------------------------------ 9. checkpoint mismatches
def _diag_checkpoint(make_trainer, tmp_path):
    module, cb = Tiny(), LaplaceCallback(structure="diag")
    trainer = make_trainer(cb)
    trainer.fit(module, loader(0))
    trainer.save_checkpoint(tmp_path / "diag.ckpt")
    return tmp_path / "diag.ckpt"


@pytest.mark.parametrize("other", [{"structure": "kron"}, {"structure": "diag", "state_key_suffix": "other"}],
                         ids=["kron", "suffix"])
def test_checkpoint_resumed_with_other_callback_settings_refused(make_trainer, tmp_path, other):
    path = _diag_checkpoint(make_trainer, tmp_path)
    cb, steps = LaplaceCallback(**other), StepCounter()
    with pytest.raises(ValueError, match="state_key_suffix"):
        make_trainer(cb, extra=(steps,)).fit(Tiny(), loader(1), ckpt_path=path)
    assert steps.steps == 0 and len(cb.server) == 0


def test_checkpoint_with_other_parameter_shapes_names_the_parameter(make_trainer, tmp_path):
    path = _diag_checkpoint(make_trainer, tmp_path)
    cb, steps = LaplaceCallback(structure="diag"), StepCounter()
    # Lightning loads the weights before callbacks see the checkpoint: torch refuses the shapes, naming the
    # parameter (bayescl never edits the user's module to get in first); the callback's own check names it too
    with pytest.raises((RuntimeError, ValueError), match=r"net\.0\.weight"):
        make_trainer(cb, extra=(steps,)).fit(Tiny(hidden=6), loader(1), ckpt_path=path)
    assert steps.steps == 0
    cb.ensure_server(Tiny(hidden=6))
    with pytest.raises(ValueError, match=r"net\.0\.weight"):
        check_server_params(torch.load(path, weights_only=False)[cb.posterior_server_key], cb.server)


# ------------------------------------------------------------------------------ 10. the site is in the fit's checkpoint
@pytest.mark.parametrize("save_last", [True, False], ids=["save_last", "latest"])
def test_committed_site_is_in_the_fits_checkpoint_and_starts_the_next_task(assert_bitwise_equal, make_trainer, tmp_path, save_last):
    module, cb = Tiny(), LaplaceCallback(structure="diag")
    ck = ModelCheckpoint(dirpath=tmp_path, save_last=save_last)
    make_trainer(cb, extra=(ck,), enable_checkpointing=True).fit(module, loader(0))
    path = ck.last_model_path if save_last else ck.best_model_path
    assert path.endswith("last.ckpt") == save_last
    saved = torch.load(path, weights_only=False)
    assert_bitwise_equal(saved[cb.posterior_server_key], cb.server.state_dict())
    assert saved["callbacks"][cb.state_key]["sites"] == ["task-0"]

    fresh_steps = StepCounter()  # what a fresh Trainer does with task 1
    fresh = make_trainer(copy.deepcopy(cb), extra=(fresh_steps,))
    fresh.fit(copy.deepcopy(module), loader(1))

    cb2, steps = LaplaceCallback(structure="diag"), StepCounter()  # a new process: new model, callback, Trainer
    trainer = make_trainer(cb2, extra=(steps,))
    trainer.fit(Tiny(), loader(1), ckpt_path=path)
    assert steps.steps == fresh_steps.steps == 2
    assert trainer.global_step == fresh.global_step
    assert list(cb2.server.names) == ["task-0", "task-1"]


# ------------------------------------------------------------------------------ 11. VCL coreset without prepare_task_data
def test_vcl_coreset_without_prepare_task_data_refused_before_any_step(make_trainer):
    cb, steps = VCLCallback(coreset_size=4, test_samples=2), StepCounter()
    with pytest.raises(ValueError, match="prepare_task_data"):
        make_trainer(cb, extra=(steps,)).fit(Tiny(), loader(0))
    assert steps.steps == 0 and cb.tasks_seen == 0


# ------------------------------------------------------------------------------ 12. BatchNorm
class BNStats(pl.Callback):
    def __init__(self):
        self.moved: list[bool] = []

    def on_train_start(self, trainer, pl_module):
        self.start = pl_module.net[1].running_mean.clone()

    def on_train_end(self, trainer, pl_module):
        self.moved.append(not torch.equal(self.start, pl_module.net[1].running_mean))


@pytest.mark.parametrize("policy", ["freeze", "train"])
def test_batchnorm_running_stats_after_the_first_task(make_trainer, policy):
    module, cb, stats = Tiny(bn=True), LaplaceCallback(structure="diag", batchnorm=policy), BNStats()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for t in range(3):
            make_trainer(cb, extra=(stats,)).fit(module, loader(t))
    assert stats.moved == ([True, False, False] if policy == "freeze" else [True, True, True])
    assert len(bayescl_warnings(rec, "BatchNorm")) == 1
    assert list(cb.server.names) == ["task-0", "task-1", "task-2"]


def test_resume_point_of_a_folder_is_its_newest_checkpoint(make_trainer, tmp_path):
    """A new ModelCheckpoint per task writes last.ckpt, then last-v1.ckpt, ...: the folder form finds the newest."""
    import os
    import time

    from bayescl import resume_point

    module, cb = Tiny(), LaplaceCallback(structure="diag")
    for t in range(2):
        ck = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        make_trainer(cb, extra=(ck,), enable_checkpointing=True).fit(module, loader(t))
        time.sleep(0.01)
    names = sorted(os.listdir(tmp_path))
    assert names == ["last-v1.ckpt", "last.ckpt"]
    assert resume_point(tmp_path / "last.ckpt").task == 1  # the stale file: task 0 committed
    point = resume_point(tmp_path)
    assert point.task == 2 and not point.finishes_task and point.ckpt_path.endswith("last-v1.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without a .ckpt"):
        resume_point(tmp_path / "empty")


@pytest.mark.parametrize("method", ["vcl", "kron"])
def test_precision_64_true_keeps_the_posterior_in_the_modules_dtype(make_trainer, method):
    """Lightning casts the module after the callbacks' setup: the posterior follows it to float64."""
    from bayescl import ClassifierModule, MultiHeadMLP, VCLCallback, synthetic_stream

    stream = synthetic_stream(num_tasks=2, n_train=64, n_test=8)
    module = ClassifierModule(MultiHeadMLP(hidden=(16,), num_tasks=2), num_tasks=2)
    cb = VCLCallback(train_samples=2, test_samples=2) if method == "vcl" else LaplaceCallback(structure="kron")
    for t in range(2):
        make_trainer(cb, precision="64-true").fit(module, stream[t].train_dataloader(batch_size=16))
    assert cb.tasks_seen == 2
    assert {v.dtype for v in cb.posterior().eta.values()} == {torch.float64}
