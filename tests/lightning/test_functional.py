"""FunctionalPriorCallback in a real pl.Trainer: less forgetting than naive, the gradient mechanism, sites, resume."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescl import ClassifierModule, synthetic_stream
from bayescl.harness.models import MLP
from bayescl.lightning.functional import FunctionalPriorCallback
from bayescl.methods.functional import functional_prior


def blobs(cx, flip, n=300, seed=0):
    """A 2-D task: a blob at (cx, 0), label = (x₁ > 0) xor flip. Two tasks with opposite rules in two places."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) * 0.7 + torch.tensor([cx, 0.0])
    return TensorDataset(x, ((x[:, 1] > 0) ^ flip).long())


def accuracy(module, ds):
    x, y = ds.tensors
    with torch.no_grad():
        return float((module(x).argmax(-1) == y).float().mean())


def test_functional_prior_reduces_forgetting_vs_naive(make_trainer):
    """Naive training on the second rule overwrites the first blob's labels; the GP prior at 20 memorable points
    of task 0 keeps them (τ = 1, the Bayesian weight)."""
    t0, t1 = blobs(-2.5, False, seed=1), blobs(2.5, True, seed=2)

    def run(callbacks):
        pl.seed_everything(0)
        module = ClassifierModule(MLP(in_features=2, hidden=(32, 32), num_classes=2), num_tasks=2, lr=1e-2)
        for ds in (t0, t1):
            pl.Trainer(max_epochs=5, callbacks=callbacks, accelerator="cpu", logger=False, enable_checkpointing=False,
                       enable_model_summary=False, enable_progress_bar=False).fit(
                module, DataLoader(ds, batch_size=32, shuffle=True))
        return accuracy(module, t0), accuracy(module, t1)

    naive_old, naive_new = run([])
    cb = FunctionalPriorCallback(memory_size=20, tau=1.0)
    fromp_old, fromp_new = run([cb])
    assert naive_old < 0.5 and fromp_old > 0.85, (naive_old, fromp_old)
    assert fromp_new > 0.9 and naive_new > 0.9
    assert list(cb.sites) == ["task-0", "task-1"] and cb.sites["task-0"].size == 20


class ZeroLoss(pl.LightningModule):
    """Data loss with zero gradient: one SGD step (lr 1) moves θ by exactly −(τ/N) ∇R(θ)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return sum((p * 0).sum() for p in self.parameters())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_term_gradient_added_once_per_optimizer_step_with_accumulation(make_trainer):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    module = ZeroLoss()
    cb = FunctionalPriorCallback(memory_size=5, tau=3.0, points_per_step=None)
    make_trainer(cb).fit(module, DataLoader(data, batch_size=4))  # task 0: its site (the weights do not move)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.4 * torch.randn_like(p))
    before = [p.detach().clone() for p in module.parameters()]
    term = functional_prior(module, list(cb.sites.values()))
    grads = torch.autograd.grad(term, list(module.parameters()))
    assert float(term.detach()) > 1e-4
    cb.auto_end_task = False
    make_trainer(cb, max_steps=1, accumulate_grad_batches=2).fit(module, DataLoader(data, batch_size=4))
    for p, b, g in zip(module.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 3.0 / len(data) * g)
    assert cb.draws == 1


def test_forget_removes_exactly_that_tasks_function_and_weight_sites(make_trainer, small_model):
    stream = synthetic_stream(num_tasks=3, n_train=96, n_test=16)
    module = ClassifierModule(small_model(), num_tasks=3)
    cb = FunctionalPriorCallback(memory_size=6, points_per_step=None)
    for t in stream:
        make_trainer(cb).fit(module, DataLoader(t.train, batch_size=32))
    assert list(cb.sites) == ["task-0", "task-1", "task-2"] and cb.server.names == ("task-0", "task-1", "task-2")
    assert all(int(s.inputs[1][0]) == i for i, s in enumerate(cb.sites.values()))  # each task's own head
    kept = {k: s.kernel.clone() for k, s in cb.sites.items() if k != "task-1"}
    removed = cb.forget(1)
    assert removed.size == 6 and list(cb.sites) == ["task-0", "task-2"]
    assert cb.server.names == ("task-0", "task-2")
    for k, s in cb.sites.items():
        assert torch.equal(s.kernel, kept[k])
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1)
        expected = functional_prior(module, [cb.sites["task-0"], cb.sites["task-2"]])
        torch.testing.assert_close(cb.functional_term(module), expected)
    with pytest.raises(KeyError, match="task 1"):
        cb.forget(1)


def test_checkpoint_resume_mid_task_equals_uninterrupted(make_trainer, small_model, tmp_path):
    stream = synthetic_stream(num_tasks=3, n_train=96, n_test=16)
    lds = [DataLoader(t.train, batch_size=32) for t in stream]

    def make_cb():
        return FunctionalPriorCallback(memory_size=6, points_per_step=4, selection="random", seed=5, tau=50.0)

    def run(stop):
        pl.seed_everything(0)
        module, cb = ClassifierModule(small_model(), num_tasks=3), make_cb()
        for i, loader in enumerate(lds):
            if i == 2 and stop:
                t = make_trainer(cb, epochs=1)
                cb.auto_end_task = False
                t.fit(module, loader)
                t.save_checkpoint(tmp_path / "mid.ckpt")
                module, cb = ClassifierModule(small_model(), num_tasks=3), make_cb()
                make_trainer(cb, epochs=2).fit(module, loader, ckpt_path=tmp_path / "mid.ckpt")
            else:
                make_trainer(cb, epochs=2).fit(module, loader)
        return module, cb

    m1, c1 = run(False)
    m2, c2 = run(True)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert list(c1.sites) == list(c2.sites) == ["task-0", "task-1", "task-2"] and c1.draws == c2.draws > 0
    for k in c1.sites:
        for a, b in zip(c1.sites[k].state_dict().values(), c2.sites[k].state_dict().values()):
            if isinstance(a, list):
                for x, y in zip(a, b):
                    torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
            else:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # a checkpoint written with another memory size is refused, naming the setting
    other = FunctionalPriorCallback(memory_size=7)
    with pytest.raises(ValueError, match="memory_size=6"):
        other.load_state_dict(c1.state_dict())


def test_bad_arguments_are_named():
    for kw, match in [({"memory_size": 0}, "memory_size"), ({"selection": "best"}, "selection='best'"),
                      ({"tau": 0.0}, "tau"), ({"points_per_step": 0}, "points_per_step"),
                      ({"output": "probs"}, "output='probs'"), ({"jitter": -1.0}, "jitter"),
                      ({"structure": "full"}, "structure='full'")]:
        with pytest.raises((ValueError, TypeError), match=match):
            FunctionalPriorCallback(**kw)


def test_memory_larger_than_the_task_is_refused_before_any_work(make_trainer):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    cb = FunctionalPriorCallback(memory_size=8)
    with pytest.raises(ValueError, match="memory_size=8 is too large for a task of 8"):
        make_trainer(cb).fit(ZeroLoss(), DataLoader(data, batch_size=4))
    assert cb.server is None or len(cb.server) == 0


def test_avalanche_plugin_single_and_multi_head():
    pytest.importorskip("avalanche", reason="avalanche-lib is not installed (pip install 'bayescl[avalanche]')")
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.models import MultiHeadClassifier, MultiTaskModule
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from bayescl.avalanche_functional import FunctionalPriorPlugin

    g = torch.Generator().manual_seed(0)

    def blobs(n, t):
        x = torch.randn(n, 16, generator=g)
        return [x, (x[:, t] > 0).long()]

    class TinyMT(MultiTaskModule):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
            self.classifier = MultiHeadClassifier(8, initial_out_features=2)

        def forward_single_task(self, x, task_label):
            return self.classifier(self.trunk(x), task_label)

    for model, labels in [(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)), [0, 0]), (TinyMT(), [0, 1])]:
        bm = tensors_benchmark(train_tensors=[blobs(40, t) for t in range(2)],
                               test_tensors=[blobs(10, t) for t in range(2)], task_labels=labels)
        plugin = FunctionalPriorPlugin(memory_size=6, points_per_step=None)
        strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                         criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, device="cpu",
                         plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
        for exp in bm.train_stream:
            strategy.train(exp)
        assert list(plugin.sites) == ["task-0", "task-1"] and plugin.server.names == ("task-0", "task-1")
        assert plugin.callback.draws > 0 and all(s.size == 6 for s in plugin.sites.values())
        assert len(plugin.sites["task-1"].inputs) == (2 if labels == [0, 1] else 1)
        plugin.forget(0)
        assert list(plugin.sites) == ["task-1"]
    with pytest.raises(ValueError, match="auto_end_task"):
        FunctionalPriorPlugin(auto_end_task=True)
    with pytest.raises(TypeError, match="FunctionalPriorCallback"):
        FunctionalPriorPlugin(callback=object())


def test_default_selection_is_the_seeded_random_choice_not_the_hessian_one():
    """The default ``selection`` is ``"random"`` (chosen on validation data, benchmarks/results/function-space-tuned):
    the default callback stores the points ``selection="random"`` stores, and not FROMP's Hessian top points."""
    torch.manual_seed(0)
    model = MLP(in_features=2, hidden=(8,), num_classes=2)
    batches = list(DataLoader(blobs(0.0, False, n=64), batch_size=16))

    def points(**kw):
        cb = FunctionalPriorCallback(memory_size=6, **kw)
        return cb.function_site(model, batches, posterior=_unit_posterior(model), task=0).inputs[0]

    default, rand, hess = points(), points(selection="random"), points(selection="hessian")
    assert torch.equal(default, rand)
    assert not torch.equal(default, hess)


def _unit_posterior(model):
    from bayescl.gaussian import DiagGaussian

    return DiagGaussian.from_mean_precision({n: p.detach().clone() for n, p in model.named_parameters()},
                                            {n: torch.ones_like(p) for n, p in model.named_parameters()})
