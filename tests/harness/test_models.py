"""The harness's reference networks: the SmallCNN single- and multi-head, with and without BatchNorm, and the
models ``bayescl bench --model`` builds."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bayescl.harness import bench, cli
from bayescl.harness.data import synthetic_stream
from bayescl.harness.models import MultiHeadMLP, SmallCNN

#: the single-head SmallCNN's parameters, as every checkpoint and result written so far names them
SINGLE_HEAD_NAMES = ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias", "head.weight",
                     "head.bias"]


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("num_tasks", [None, 3])
def test_small_cnn_output_shape_for_flat_and_image_inputs(num_tasks, batchnorm):
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, num_tasks=num_tasks, batchnorm=batchnorm).eval()
    x = torch.rand(5, 1, 28, 28)
    task_id = None if num_tasks is None else torch.tensor([0, 1, 2, 1, 0])
    image, flat = model(x, task_id), model(x.reshape(5, 784), task_id)
    assert image.shape == flat.shape == (5, 4)
    torch.testing.assert_close(image, flat)


def test_small_cnn_single_head_keeps_its_parameter_names():
    """``num_tasks=None`` is exactly the module it always was (old checkpoints and results load)."""
    model = SmallCNN()
    assert [n for n, _ in model.named_parameters()] == SINGLE_HEAD_NAMES
    assert list(model.state_dict()) == SINGLE_HEAD_NAMES  # no buffers either
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10


def test_small_cnn_multi_head_names_and_routing_per_row():
    """A batch that mixes tasks: row b is head task_id[b] applied to the shared features (each head called alone)."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=2, num_tasks=3, batchnorm=True).eval()
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if n.startswith("heads.")] == [f"heads.{t}.{p}" for t in range(3) for p in ("weight",
                                                                                                        "bias")]
    assert not hasattr(model, "head")
    x = torch.rand(6, 784)
    task_id = torch.tensor([2, 0, 1, 1, 2, 0])
    out = model(x, task_id)
    h = model.features(x.reshape(6, 1, 28, 28))
    expected = torch.stack([model.heads[int(t)](h[b]) for b, t in enumerate(task_id)])
    torch.testing.assert_close(out, expected)
    for t in range(3):  # the int and one-task-batch forms give each head's own rows
        rows = task_id == t
        torch.testing.assert_close(model(x[rows], t), expected[rows])
        torch.testing.assert_close(model(x[rows], task_id[rows]), expected[rows])
    assert not torch.allclose(model(x, 0), model(x, 1))  # the heads differ


@pytest.mark.parametrize("model", [SmallCNN(num_classes=2, num_tasks=3), MultiHeadMLP(hidden=(8,), num_tasks=3)])
def test_multi_head_networks_refuse_a_missing_or_out_of_range_task_id(model):
    x = torch.rand(2, 784)
    with pytest.raises(ValueError, match=f"{type(model).__name__} needs task_id"):
        model(x)
    with pytest.raises(ValueError, match=r"task_id=3 is out of range; allowed: 0\.\.2"):
        model(x, 3)
    with pytest.raises(ValueError, match=r"task_id contains -1, out of range; allowed: 0\.\.2"):
        model(x, torch.tensor([0, -1]))


def test_small_cnn_batchnorm_only_when_asked_after_each_conv_before_its_relu():
    assert not any(isinstance(m, nn.BatchNorm2d) for m in SmallCNN().modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in SmallCNN(num_tasks=2).modules())
    layers = list(SmallCNN(channels=(4, 6), batchnorm=True).features)
    bns = [i for i, m in enumerate(layers) if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2
    for i in bns:
        assert isinstance(layers[i - 1], nn.Conv2d) and isinstance(layers[i + 1], nn.ReLU)
        assert layers[i].num_features == layers[i - 1].out_channels


def test_small_cnn_refuses_bad_arguments():
    with pytest.raises(ValueError, match="num_tasks=0"):
        SmallCNN(num_tasks=0)
    with pytest.raises(ValueError, match="channels="):
        SmallCNN(channels=(4, 8, 16))


@pytest.mark.parametrize("kind,batchnorm", [("cnn", False), ("cnn-bn", True)])
def test_default_model_cnn_for_task_and_domain_streams(kind, batchnorm):
    task_il = bench.default_model(synthetic_stream(num_tasks=4, n_train=8, n_test=8), kind)
    assert isinstance(task_il, SmallCNN) and len(task_il.heads) == 4 and task_il.heads[0].out_features == 2
    assert any(isinstance(m, nn.BatchNorm2d) for m in task_il.modules()) == batchnorm
    assert task_il(torch.rand(3, 784), torch.tensor([0, 3, 1])).shape == (3, 2)
    domain = bench.default_model(synthetic_stream(num_tasks=2, n_train=8, n_test=8, setting="domain"), kind)
    assert isinstance(domain, SmallCNN) and not hasattr(domain, "heads") and domain.head.out_features == 2
    assert any(isinstance(m, nn.BatchNorm2d) for m in domain.modules()) == batchnorm


def test_bad_model_name_lists_the_allowed_ones():
    stream = synthetic_stream(num_tasks=2, n_train=8, n_test=8)
    with pytest.raises(ValueError, match="model='resnet' is not valid; allowed: mlp, cnn, cnn-bn"):
        bench.default_model(stream, "resnet")
    with pytest.raises(ValueError, match="allowed: mlp, cnn, cnn-bn"):
        bench.BenchConfig(scenario="synthetic", strategy="naive", model="cnn_bn").validate()


def test_cli_model_choices_are_the_bench_models(capsys):
    """``--model`` (bench and tune) offers exactly bench.MODELS (spelt out in the CLI so --help needs no torch)."""
    assert cli._MODELS == bench.MODELS
    for cmd in ("bench", "tune"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--scenario", "synthetic", "--strategy", "naive", "--model", "resnet"])
        assert "choose from 'mlp', 'cnn', 'cnn-bn'" in capsys.readouterr().err


def test_bench_split_fashion_task_cnn_bn_laplace_default(fashion_root, tmp_path, monkeypatch, capsys):
    """``bayescl bench --scenario split-fashion-task --model cnn-bn --strategy laplace-default`` on real data
    finishes and writes its JSON; LaplaceCallback's default batchnorm="freeze" keeps the first task's BatchNorm
    running statistics through task 2 while the BatchNorm affine weights keep training, under a diagonal posterior
    that holds them."""
    after: list[dict] = []  # per task: the BatchNorm state and the callback's posterior, when the task is tested
    save = bench._save_progress

    def record(state_dir, cfg, trainer, module, done, *args, **kwargs):
        bns = [m for m in module.model.modules() if isinstance(m, nn.BatchNorm2d)]
        laplace = [cb for cb in trainer.callbacks if type(cb).__name__ == "LaplaceCallback"]
        assert len(bns) == 2 and len(laplace) == 1
        after.append({"stats": [(m.running_mean.clone(), m.running_var.clone()) for m in bns],
                      "affine": [m.weight.detach().clone() for m in bns], "posterior": laplace[0].posterior()})
        return save(state_dir, cfg, trainer, module, done, *args, **kwargs)

    monkeypatch.setattr(bench, "_save_progress", record)
    rc = cli.main(["bench", "--scenario", "split-fashion-task", "--model", "cnn-bn", "--strategy", "laplace-default",
                   "--limit", "200", "--num-tasks", "2", "--epochs", "1", "--data-root", str(fashion_root),
                   "--out", str(tmp_path), "--no-progress", "--no-report"])
    assert rc == 0
    doc = json.loads((tmp_path / "split-fashion-task" / "laplace-default.json").read_text())
    assert doc["config"]["model"] == "cnn-bn" and doc["strategy"] == "laplace-default"
    (R,) = doc["accuracy_matrix"]
    assert len(R) == 2 and all(len(row) == 2 for row in R) and R[0][0] > 0.5  # a 2-way head learnt something
    assert len(after) == 2
    for (mean1, var1), (mean2, var2) in zip(after[0]["stats"], after[1]["stats"]):
        assert mean1.abs().sum() > 0 and not torch.allclose(var1, torch.ones_like(var1))  # task 1 moved them
        torch.testing.assert_close(mean2, mean1, rtol=0, atol=0)  # frozen from the second task on
        torch.testing.assert_close(var2, var1, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(after[0]["affine"], after[1]["affine"]))  # still trained
    q = after[0]["posterior"]
    assert type(q).__name__ == "DiagGaussian"
    bn_names = [n for n in q.names if n.endswith(("features.1.weight", "features.1.bias", "features.5.weight",
                                                  "features.5.bias"))]
    assert len(bn_names) == 4  # every BatchNorm parameter has a posterior
    for n in bn_names:  # with the curvature of task 1 on top of the prior precision (1e-4)
        assert q.precision[n].shape == q.mean[n].shape and float(q.precision[n].max()) > 1e-3
