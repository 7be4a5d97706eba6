"""The Avalanche integration: the plugins inside Avalanche strategies, Avalanche benchmarks as TaskStreams (harness),
and the harness's refusal of recipes that name an Avalanche strategy."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("avalanche", reason="avalanche-lib is not installed (pip install 'bayescl[avalanche]')")

from avalanche.benchmarks import benchmark_from_datasets, tensors_benchmark, with_task_labels
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

import bayescl
from bayescl import LaplaceCallback
from bayescl.avalanche import ExperienceBatches, LaplacePlugin, VCLPlugin
from bayescl.harness.avalanche_stream import _parse_spec, make_avalanche_stream, stream_from_benchmark
from bayescl.harness.bench import BenchConfig, run_benchmark
from bayescl.harness.cli import main

warnings.filterwarnings("ignore", ".*No loggers specified.*")


# --------------------------------------------------------------------------------------------------- fixtures
def _blobs(n: int, t: int, g: torch.Generator, classes=(0, 1)) -> list[torch.Tensor]:
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.tensor(classes)[(x.flatten(1)[:, t] > 0).long()]
    return [x, y]


def tiny_benchmark(task_labels=(0, 1, 2), classes=None, n_train=48, n_test=24, seed=0):
    """3 experiences of 4x4 inputs; label = sign of one pixel (a different pixel per experience)."""
    g = torch.Generator().manual_seed(seed)
    classes = classes or [(0, 1)] * len(task_labels)
    return tensors_benchmark(
        train_tensors=[_blobs(n_train, t, g, c) for t, c in enumerate(classes)],
        test_tensors=[_blobs(n_test, t, g, c) for t, c in enumerate(classes)],
        task_labels=list(task_labels),
    )


class TinyMT(MultiTaskModule):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.classifier = MultiHeadClassifier(8, initial_out_features=2)

    def forward(self, x, task_labels):
        return self.classifier(self.trunk(x), task_labels)

    def forward_single_task(self, x, task_label):
        return self.classifier(self.trunk(x), task_label)


def tiny_mlp(out=2):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, out))


def naive(model, plugins, epochs=1, mb=16, evaluator=None):
    return Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=mb, train_epochs=epochs, eval_mb_size=64,
                 device="cpu", plugins=plugins, evaluator=evaluator or EvaluationPlugin(loggers=[]))


# --------------------------------------------------------------------------------------------------- plugin
def test_plugin_is_a_supervised_plugin_and_checks_arguments():
    p = LaplacePlugin(structure="kron", fisher="exact")
    assert isinstance(p, SupervisedPlugin) and p.supports_distributed is False
    assert p.callback.structure.value == "kron" and p.callback.auto_end_task is False
    with pytest.raises(ValueError, match="not both"):
        LaplacePlugin(callback=LaplaceCallback(), lam=2.0)
    with pytest.raises(ValueError, match="Lightning-only"):
        LaplacePlugin(dataloader=[])
    with pytest.raises(TypeError, match="LaplaceCallback"):
        LaplacePlugin(callback=object())
    with pytest.raises(ValueError, match="structure"):
        LaplacePlugin(structure="full")


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_plugin_multihead_adds_a_site_per_experience_and_new_heads_get_the_prior(structure):
    torch.manual_seed(0)
    bm = tiny_benchmark()
    model = TinyMT()
    plugin = LaplacePlugin(structure=structure)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    strategy = naive(model, [plugin], epochs=2, evaluator=evaluator)
    for i, exp in enumerate(bm.train_stream):
        strategy.train(exp)
        assert plugin.server.names == tuple(f"task-{k}" for k in range(i + 1))
        assert plugin.callback.num_examples == 48
        assert {n for n, _ in model.named_parameters()} <= set(plugin.server.prior.names)
        assert f"classifier.classifiers.{i}.classifier.weight" in plugin.posterior().names
    res = strategy.eval(bm.test_stream)
    accs = [v for k, v in res.items() if k.startswith("Top1_Acc_Exp/eval_phase/test_stream/Task00")]
    assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs)
    plugin.forget(2)
    assert plugin.server.names == ("task-0", "task-1")


class _GradSpy(SupervisedPlugin):
    """Records the gradients and weights seen in ``before_update`` at the 3rd step of every experience."""

    def __init__(self):
        super().__init__()
        self.grads: list[dict[str, torch.Tensor]] = []
        self.params: list[dict[str, torch.Tensor]] = []

    def before_training_exp(self, strategy, *args, **kwargs):
        self._step = 0

    def before_update(self, strategy, *args, **kwargs):
        self._step += 1
        if self._step == 3:
            named = list(strategy.model.named_parameters())
            self.grads.append({n: p.grad.clone() for n, p in named if p.grad is not None})
            self.params.append({n: p.detach().clone() for n, p in named})


def _spied_run(plugin) -> tuple[_GradSpy, _GradSpy]:
    """Train TinyMT (seed 0) on the first two experiences with ``plugin`` between two gradient spies."""
    torch.manual_seed(0)
    bm = tiny_benchmark()
    model = TinyMT()
    before, after = _GradSpy(), _GradSpy()
    strategy = naive(model, [before, plugin, after])
    for exp in bm.train_stream[:2]:
        strategy.train(exp)
    return before, after


def test_prior_gradient_is_added_in_before_update_once_per_step():
    plugin = LaplacePlugin(structure="diag", prior_precision=1.0, lam=100.0, normalize=False)  # float32 tolerances
    before, after = _spied_run(plugin)
    # experience 0: no site yet, nothing added; experience 1: exactly (Λθ − η) / N_1 added, with the prior of
    # experience 1 (removing the latest site gives it back exactly; it covers the head grown for experience 1)
    assert all(torch.equal(before.grads[0][n], after.grads[0][n]) for n in before.grads[0])
    plugin.forget(1)
    prev = plugin.posterior()
    assert "classifier.classifiers.1.classifier.weight" in prev.names
    expected = prev.quadratic_grad({n: after.params[1][n] for n in prev.names})
    for n in after.grads[1]:
        added = after.grads[1][n] - before.grads[1].get(n, torch.zeros_like(after.grads[1][n]))
        torch.testing.assert_close(added, expected[n] / 48, rtol=1e-4, atol=1e-7)
    assert float(expected["trunk.1.weight"].abs().max()) > 0


def test_plugin_single_head_model_drops_task_labels():
    torch.manual_seed(0)
    bm = tiny_benchmark(task_labels=(0, 0, 0), classes=[(0, 1), (2, 3), (4, 5)])
    model = tiny_mlp(out=6)
    plugin = LaplacePlugin(structure="kron")
    strategy = naive(model, [plugin])
    for exp in bm.train_stream:
        strategy.train(exp)
    assert plugin.server.names == ("task-0", "task-1", "task-2")
    batches = list(plugin.curvature_batches(SimpleNamespace(experience=bm.train_stream[0], model=model,
                                                            train_mb_size=20)))
    assert [len(b) for b in batches] == [2, 2, 2] and sum(len(b[1]) for b in batches) == 48


def test_experience_batches_split_mixed_task_labels():
    x = torch.randn(10, 3)
    y = torch.arange(10) % 2
    t = torch.tensor([0, 1] * 5)
    ds = torch.utils.data.TensorDataset(x, y, t)
    out = list(ExperienceBatches(ds, batch_size=6, multi_task=True))
    assert all(len(b) == 3 and b[2].unique().numel() == 1 for b in out)
    assert sum(len(b[0]) for b in out) == 10
    assert [len(b) for b in ExperienceBatches(ds, batch_size=6)] == [2, 2]


# --------------------------------------------------------------------------------------------------- VCL plugin
def test_vcl_plugin_checks_arguments():
    from bayescl.lightning.vcl import VCLCallback

    p = VCLPlugin(test_samples=3)
    assert isinstance(p, SupervisedPlugin) and p.supports_distributed is False
    assert p.callback.test_samples == 3 and p.callback.auto_end_task is False
    with pytest.raises(ValueError, match="not supported by VCLPlugin yet"):
        VCLPlugin(coreset_size=5)
    with pytest.raises(ValueError, match="not supported by VCLPlugin yet"):
        VCLPlugin(callback=VCLCallback(coreset_size=5))
    with pytest.raises(ValueError, match="not supported by VCLPlugin yet"):
        VCLPlugin(train_samples=2, vectorize_samples=False)
    with pytest.raises(ValueError, match="not both"):
        VCLPlugin(callback=VCLCallback(), test_samples=2)
    with pytest.raises(ValueError, match="Lightning-only"):
        VCLPlugin(auto_end_task=True)
    with pytest.raises(TypeError, match="VCLCallback"):
        VCLPlugin(callback=LaplaceCallback())


def _optimized(strategy) -> set[int]:
    return {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}


def test_vcl_plugin_multihead_two_experiences_sites_layers_optimizer_and_eval():
    from bayescl.methods.variational import BayesLinear, variational_layers

    torch.manual_seed(0)
    bm = tiny_benchmark()
    model = TinyMT()
    plugin = VCLPlugin(test_samples=4, ml_init=True, ml_epochs=1)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    strategy = naive(model, [plugin], epochs=2, evaluator=evaluator)
    for i, exp in enumerate(bm.train_stream[:2]):
        strategy.train(exp)
        assert plugin.server.names == tuple(f"task-{k}" for k in range(i + 1))
        assert plugin.callback.num_examples == 48 and plugin.callback.tasks_seen == i + 1
        # every Linear (trunk and the heads grown so far) is variational; no plain weight is left
        assert isinstance(model.trunk[1], BayesLinear)
        assert isinstance(model.classifier.classifiers[str(i)].classifier, BayesLinear)
        assert not any(n.endswith((".weight", ".bias")) for n, _ in model.named_parameters())
        # the optimizer holds exactly the model's (variational) parameters
        named = dict(model.named_parameters())
        assert _optimized(strategy) == {id(p) for p in named.values()}
        assert id(named["trunk.1.weight_mu"]) in _optimized(strategy)
        assert id(named[f"classifier.classifiers.{i}.classifier.weight_logvar"]) in _optimized(strategy)
        assert strategy.optimized_param_id["trunk.1.weight_mu"] is named["trunk.1.weight_mu"]
        # ... and steps them: the log-variances left their initial value (-6)
        assert float((named["trunk.1.weight_logvar"].detach() + 6.0).abs().max()) > 1e-3
    assert set(variational_layers(model)) == {"trunk.1", "classifier.classifiers.0.classifier",
                                              "classifier.classifiers.1.classifier"}
    # the posterior moved away from the base prior on the trunk and on both heads, and the layers hold it
    q = plugin.posterior()
    for n in ("trunk.1.weight", "classifier.classifiers.0.classifier.weight",
              "classifier.classifiers.1.classifier.weight"):
        assert float(q.mean[n].abs().max()) > 0
        torch.testing.assert_close(q.mean[n], dict(model.named_parameters())[n + "_mu"].detach())
    # evaluation: MC-averaged log-probabilities, accuracies from Avalanche's metrics
    res = strategy.eval(bm.test_stream[:2])
    accs = [v for k, v in res.items() if k.startswith("Top1_Acc_Exp/eval_phase/test_stream/Task")]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    model.eval()
    x = bm.test_stream[0].dataset[0][0].unsqueeze(0)
    out = model(x, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(1))


def test_vcl_plugin_train_samples_repeat_the_minibatch_in_one_pass():
    torch.manual_seed(0)
    bm = tiny_benchmark()
    model = TinyMT()
    plugin = VCLPlugin(test_samples=2, train_samples=3, ml_init=True, ml_epochs=1)
    rows, losses = [], []

    class Probe(SupervisedPlugin):
        def after_forward(self, strategy, *args, **kwargs):
            rows.append((len(strategy.mb_x), len(strategy.mb_y), len(strategy.mb_output)))

        def before_backward(self, strategy, *args, **kwargs):
            losses.append(float(strategy.loss))

    strategy = naive(model, [plugin, Probe()], epochs=2)
    strategy.train(bm.train_stream[0])
    steps = len(rows) // 2
    # epoch 0: the deterministic maximum-likelihood fit, plain minibatches; epoch 1: three samples per row
    assert [r[0] for r in rows[:steps]] == [r[0] // 3 for r in rows[steps:]]
    assert all(a == b == c for a, b, c in rows) and all(torch.isfinite(torch.tensor(losses)))
    from bayescl.methods.variational import variational_layers

    assert all(layer.tiles == 1 for layer in variational_layers(model).values())
    assert plugin.server.names == ("task-0",)


def test_vcl_plugin_adds_the_kl_gradient_in_before_update():
    from bayescl.gaussian.diag import diag_gaussian_kl

    plugin = VCLPlugin(ml_init=True, ml_epochs=1, test_samples=2)
    before, after = _spied_run(plugin)
    # experience 0, epoch 0: the maximum-likelihood start, nothing added
    assert all(torch.equal(before.grads[0][n], after.grads[0][n]) for n in before.grads[0])
    # experience 1: exactly ∇KL(q || q_0) / N_1 added, on the layers with a data gradient
    plugin.forget(1)
    prev = plugin.posterior()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in after.params[1].items()}
    mean, prec = prev.mean, prev.precision
    layers = ("trunk.1", "classifier.classifiers.1.classifier")
    kl = sum(diag_gaussian_kl(params[f"{l}.{k}_mu"], params[f"{l}.{k}_logvar"], mean[f"{l}.{k}"], prec[f"{l}.{k}"])
             for l in layers for k in ("weight", "bias"))
    expected = dict(zip(params, torch.autograd.grad(kl, list(params.values()), allow_unused=True)))
    checked = 0
    for n in after.grads[1]:
        added = after.grads[1][n] - before.grads[1][n]
        if n.startswith("classifier.classifiers.0."):
            assert float(added.abs().max()) == 0  # the other task's head got no data gradient
            continue
        torch.testing.assert_close(added, expected[n] / 48, rtol=1e-4, atol=1e-7)
        checked += 1
    assert checked == 8 and float(expected["trunk.1.weight_mu"].abs().max()) > 0


def test_vcl_plugin_computes_the_kl_value_every_check_every_iterations_and_a_nan_still_stops_training(monkeypatch):
    """The gradient on every iteration, the value (with its finiteness check) on each epoch's first iteration and
    every ``check_every`` after it; a log-variance made NaN on a value-less iteration stops training on the next
    iteration that computes the value, and the posterior of the finished experience survives."""
    torch.manual_seed(0)
    bm = tiny_benchmark()
    plugin = VCLPlugin(ml_init=False, test_samples=2)
    plugin.check_every = 2
    calls = []
    real = plugin.callback.add_prior_grad

    def spy(model, epoch=None, only=None, value=True):
        calls.append(value)
        return real(model, epoch, only=only, value=value)

    monkeypatch.setattr(plugin.callback, "add_prior_grad", spy)
    strategy = naive(TinyMT(), [plugin], epochs=2)  # 48 examples, minibatch 16: 3 iterations per epoch
    strategy.train(bm.train_stream[0])
    assert calls == [True, False, True] * 2
    kept = plugin.posterior()

    class Poison(SupervisedPlugin):
        def before_update(self, strategy, *args, **kwargs):
            if strategy.clock.train_epoch_iterations == 1:
                with torch.no_grad():
                    strategy.model.trunk[1].weight_logvar[0, 0] = float("nan")

    calls.clear()
    strategy.plugins.insert(0, Poison())
    with pytest.raises(ValueError, match="not finite"):
        strategy.train(bm.train_stream[1])
    assert calls == [True, False, True]  # the NaN went in at the 2nd iteration and was caught at the 3rd
    after = plugin.posterior()
    assert all(torch.equal(after.mean[n], kept.mean[n]) for n in kept.names)


# --------------------------------------------------------------------------------------------------- streams
def test_stream_from_task_incremental_benchmark():
    bm = tiny_benchmark(task_labels=(0, 1, 2), n_train=30, n_test=10)
    stream = stream_from_benchmark(bm, name="tiny")
    assert (stream.name, stream.setting, stream.num_classes, len(stream)) == ("tiny", "task", 2, 3)
    assert stream.with_task_id
    for i, task in enumerate(stream):
        assert task.task_id == i and len(task.train) == 30 and len(task.test) == 10
        x, y, t = next(iter(task.train_dataloader(batch_size=30, shuffle=False)))
        assert x.shape == (30, 1, 4, 4) and set(t.tolist()) == {i} and set(y.tolist()) <= {0, 1}
        torch.testing.assert_close(y, (x.flatten(1)[:, i] > 0).long())
    lim = stream_from_benchmark(bm, limit=7, num_tasks=2, seed=1)
    mat = stream_from_benchmark(bm, materialize=True, limit=7, num_tasks=2, seed=1)
    assert len(mat) == 2 and len(mat[1].train) == 7 and len(mat[1].test) == 7
    assert all(torch.equal(a, b) for i in range(7) for a, b in zip(mat[1].train[i], lim[1].train[i]))


def test_stream_settings_class_and_domain():
    cls = stream_from_benchmark(tiny_benchmark(task_labels=(0, 0, 0), classes=[(0, 1), (2, 3), (4, 5)]))
    assert (cls.setting, cls.num_classes, cls.with_task_id) == ("class", 6, False)
    assert [t.classes for t in cls] == [(0, 1), (2, 3), (4, 5)]
    assert len(cls[2].train[0]) == 2 and int(cls[2].train[0][1]) in (4, 5)
    dom = stream_from_benchmark(tiny_benchmark(task_labels=(0, 0, 0)))
    assert (dom.setting, dom.num_classes) == ("domain", 2)
    forced = stream_from_benchmark(tiny_benchmark(task_labels=(0, 0, 0)), with_task_id=True)
    assert forced.setting == "task" and len(forced[0].train[0]) == 3


def test_stream_from_benchmark_from_datasets_rejects_mismatched_streams():
    bm = tiny_benchmark()
    ds = [e.dataset for e in bm.train_stream]
    bad = with_task_labels(benchmark_from_datasets(train=ds, test=ds[:2]))
    with pytest.raises(ValueError, match="one test experience per training experience"):
        stream_from_benchmark(bad)


def test_lightning_loop_on_an_avalanche_stream(make_trainer, small_model):
    from bayescl import ClassifierModule

    stream = stream_from_benchmark(tiny_benchmark(n_train=32))
    module = ClassifierModule(small_model(in_features=16, hidden=(8,), num_tasks=len(stream), seed=None), len(stream))
    cb = LaplaceCallback(structure="diag")
    for task in stream:
        trainer = make_trainer(cb)
        trainer.fit(module, task.train_dataloader(batch_size=16))
    assert cb.server.names == ("task-0", "task-1", "task-2") and cb.num_examples == 32


def test_parse_spec():
    assert _parse_spec("avalanche:SplitMNIST") == ("SplitMNIST", {})
    assert _parse_spec("avalanche:PermutedMNIST:n_experiences=3, return_task_id=true") == (
        "PermutedMNIST", {"n_experiences": 3, "return_task_id": True})
    with pytest.raises(ValueError, match="key=value"):
        _parse_spec("avalanche:SplitMNIST:oops")
    with pytest.raises(ValueError, match="not a benchmark"):
        make_avalanche_stream("avalanche:NoSuchBenchmark")


# --------------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_real_split_mnist(data_root):
    stream = make_avalanche_stream("avalanche:SplitMNIST", root=data_root, limit=200)
    assert (stream.setting, stream.num_classes, len(stream)) == ("task", 2, 5)
    assert [t.classes for t in stream] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for i, task in enumerate(stream):
        x, y, t = task.train.tensors
        assert x.shape == (200, 1, 28, 28) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert set(t.tolist()) == {i} and set(y.tolist()) == {0, 1} and len(task.test) == 200

    # the plugin on Avalanche's SplitMNIST data (those 200 examples per experience, 3 experiences), with a
    # MultiHeadClassifier growing a head per experience
    small = tensors_benchmark(train_tensors=[list(t.train.tensors[:2]) for t in stream[:3]],
                              test_tensors=[list(t.test.tensors[:2]) for t in stream[:3]], task_labels=[0, 1, 2])

    class MT(MultiTaskModule):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
            self.classifier = MultiHeadClassifier(32)

        def forward(self, x, task_labels):
            return self.classifier(self.trunk(x), task_labels)

    torch.manual_seed(0)
    plugin = LaplacePlugin(structure="kron")
    strategy = naive(MT(), [plugin], epochs=2, evaluator=EvaluationPlugin(accuracy_metrics(experience=True),
                                                                          loggers=[]))
    for exp in small.train_stream:
        strategy.train(exp)
    assert plugin.server.names == ("task-0", "task-1", "task-2")
    res = strategy.eval(small.test_stream)
    accs = [v for k, v in res.items() if k.startswith("Top1_Acc_Exp")]
    assert len(accs) == 3 and min(accs) > 0.8


# --------------------------------------------------------------------------------------------------- packaging
def test_lazy_attribute_after_a_bare_import(monkeypatch):
    monkeypatch.delattr(bayescl, "avalanche", raising=False)  # as after a bare `import bayescl`
    assert "avalanche" in dir(bayescl)
    assert bayescl.avalanche.LaplacePlugin is LaplacePlugin
    assert bayescl.avalanche.VCLPlugin is VCLPlugin


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.delitem(sys.modules, "bayescl.avalanche")
    monkeypatch.setitem(sys.modules, "avalanche.core", None)  # `import avalanche.core` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "bayescl\[avalanche\]"'):
        import bayescl.avalanche  # noqa: F401


def test_adapter_does_not_expose_the_harness_streams():
    assert not hasattr(bayescl.avalanche, "stream_from_benchmark")
    assert not any(m.startswith("bayescl.harness") for m in vars(bayescl.avalanche).values()
                   if isinstance(m, str))


# --------------------------------------------------------------------------------------------------- harness
@pytest.mark.parametrize("recipe", ["avalanche-ewc", "avalanche-si", "avalanche-naive", "avalanche-replay"])
def test_harness_refuses_avalanche_recipes_before_training(recipe, tmp_path):
    cfg = BenchConfig(scenario="synthetic", strategy=recipe, epochs=1, num_tasks=2, uncertainty=False)
    logged: list[str] = []
    with pytest.raises(ValueError, match=rf"strategy='{recipe}' is an Avalanche recipe .*avalanche_compare\.py"):
        run_benchmark(cfg, out_dir=tmp_path, log=logged.append)
    assert logged == [] and not list(Path(tmp_path).rglob("*"))  # nothing trained, nothing labelled


def test_cli_refuses_avalanche_recipe(capsys, tmp_path):
    rc = main(["bench", "--scenario", "synthetic", "--strategy", "avalanche-ewc", "--epochs", "1",
               "--num-tasks", "2", "--out", str(tmp_path), "--no-progress", "--no-report"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "avalanche.training.EWC" in err and "naive" in err and "avalanche-si" not in err.split("choose")[-1]
    assert not list(Path(tmp_path).rglob("*.json"))


def test_vcl_plugin_keeps_parameter_groups_through_make_optimizer():
    torch.manual_seed(0)
    bm = tiny_benchmark()
    model = TinyMT()
    opt = torch.optim.Adam([{"params": model.trunk.parameters(), "lr": 1e-2},
                            {"params": model.classifier.parameters(), "lr": 1e-3}])
    strategy = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1,
                     device="cpu", plugins=[VCLPlugin(ml_init=False)], evaluator=EvaluationPlugin(loggers=[]))
    for exp in bm.train_stream[:2]:
        strategy.train(exp)
    groups = [{id(p) for p in g["params"]} for g in strategy.optimizer.param_groups]
    assert [g["lr"] for g in strategy.optimizer.param_groups] == [1e-2, 1e-3]
    assert groups[0] == {id(p) for p in model.trunk.parameters()}
    assert groups[1] == {id(p) for p in model.classifier.parameters()}


def test_vcl_plugin_needs_a_strategy_with_make_optimizer():
    with pytest.raises(TypeError, match="make_optimizer"):
        VCLPlugin().convert_model(SimpleNamespace(model=tiny_mlp()))


def test_avalanche_replay_recipe_keeps_a_fixed_memory_per_experience():
    """benchmarks/avalanche_compare.py builds the avalanche-replay recipe's nested specs (plugin, storage policy);
    the buffer holds memory_per_task examples of each experience from the start, as ReplayCallback does."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import avalanche_compare as ac
    finally:
        sys.path.pop(0)
    (run,) = ac.recipe_runs(["avalanche-replay"])
    assert run["init_args"] == ac.replay_spec(200)["init_args"]  # the recipe is the script's replay row
    (plugin,) = ac.build(run["init_args"])["plugins"]
    assert plugin.mem_size == 1000 and plugin.storage_policy.get_group_lengths(1) == [200]
    spec = ac.replay_spec(memory_per_task=10, experiences=3)
    init_args = ac.build(spec["init_args"])
    torch.manual_seed(0)
    model = tiny_mlp()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, device="cpu",
                     evaluator=EvaluationPlugin(loggers=[]), **init_args)
    for i, exp in enumerate(tiny_benchmark(task_labels=(0, 0, 0)).train_stream[:2]):
        strategy.train(exp)
        groups = init_args["plugins"][0].storage_policy.buffer_groups
        assert [len(g.buffer) for g in groups.values()] == [10] * (i + 1)


def test_avalanche_tune_splits_every_experience_and_keeps_what_multi_head_models_need():
    """benchmarks/avalanche_tune.py's validation split: each training experience is partitioned (seeded) into a
    training and a validation copy with its task label, classes and index, and a multi-head model evaluates on the
    validation copies under the metric key avalanche_compare.run_one reads."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import avalanche_tune as at
    finally:
        sys.path.pop(0)
    bm = tiny_benchmark(task_labels=(0, 1, 2))
    train, valid = at.split_streams(bm.train_stream, 0.25, seed=0)
    again, _ = at.split_streams(bm.train_stream, 0.25, seed=0)
    other, _ = at.split_streams(bm.train_stream, 0.25, seed=1)
    for exp, tr, va, tr2, tr3 in zip(bm.train_stream, train, valid, again, other):
        x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
        xt = torch.stack([tr.dataset[i][0] for i in range(len(tr.dataset))])
        xv = torch.stack([va.dataset[i][0] for i in range(len(va.dataset))])
        assert (len(xt), len(xv)) == (36, 12)
        both = torch.cat([xt, xv]).flatten(1)
        assert torch.equal(both[torch.argsort(both[:, 0])], x.flatten(1)[torch.argsort(x.flatten(1)[:, 0])])
        assert not any(bool((row == xv.flatten(1)).all(1).any()) for row in xt.flatten(1))  # disjoint
        for part in (tr, va):
            assert part.task_label == exp.task_label and part.current_experience == exp.current_experience
            assert list(part.classes_in_this_experience) == list(exp.classes_in_this_experience)
        xt2 = torch.stack([tr2.dataset[i][0] for i in range(len(tr2.dataset))])
        xt3 = torch.stack([tr3.dataset[i][0] for i in range(len(tr3.dataset))])
        assert torch.equal(xt, xt2) and not torch.equal(xt, xt3)
    torch.manual_seed(0)
    model = TinyMT()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, device="cpu",
                     evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    strategy.train(train[1])
    res = strategy.eval(valid[:2])
    assert {"Top1_Acc_Exp/eval_phase/train_stream/Task000/Exp000",
            "Top1_Acc_Exp/eval_phase/train_stream/Task001/Exp001"} <= set(res)


def test_avalanche_tune_plugin_families_pass_their_value_to_the_callback_and_keep_its_other_defaults(monkeypatch):
    """avalanche_tune.py's ``laplace`` and ``vcl`` families: each candidate's value reaches the callback through the
    spec's ``bayescl_init_args`` (merged into the ``laplace-default`` / ``vcl-default`` recipe), the plugin matches the
    callback, and the callback's other arguments stay the defaults."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import avalanche_compare as ac
        import avalanche_tune as at
    finally:
        sys.path.pop(0)
    built = []

    class Stop(Exception):
        pass

    def plugin(callback):
        built.append(callback)
        raise Stop  # the spec is what is under test, not a training run

    monkeypatch.setattr(ac, "LaplacePlugin", plugin)
    monkeypatch.setattr(ac, "VCLPlugin", lambda callback: plugin(("vcl", callback)))
    args = SimpleNamespace(setting="task", lr=1e-3)
    for lam in (0.3, 7.0):
        with pytest.raises(Stop):
            ac.run_one({"name": "x", **at.FAMILIES["laplace"](lam)}, None, 0, args)
    default = LaplaceCallback()
    assert [cb.lam for cb in built] == [0.3, 7.0]
    for cb in built:
        assert isinstance(cb, LaplaceCallback)
        assert (cb.normalize, cb.structure, cb.online) == (default.normalize, default.structure, default.online)
    with pytest.raises(Stop):  # the vcl family: VCLPlugin, the "λ" is the fan-in ratio of the initial variances
        ac.run_one({"name": "x", **at.FAMILIES["vcl"](3.0)}, None, 0, args)
    kind, cb = built[-1]
    assert kind == "vcl" and isinstance(cb, bayescl.VCLCallback) and cb.logvar_init == "fan_in:3"
    assert cb.train_samples == bayescl.VCLCallback().train_samples
