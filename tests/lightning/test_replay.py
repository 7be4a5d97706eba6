"""ReplayCallback: the stored memory, the gradient it adds, task boundaries, checkpoints, errors, and forgetting."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from bayescl import ClassifierModule, synthetic_stream
from bayescl.harness.recipes import load_recipe
from bayescl.lightning.replay import ReplayCallback
from bayescl.lightning.resume import resume_point


def loader(ds, bs=16):
    return DataLoader(ds, batch_size=bs, shuffle=False)


class GradRecorder(pl.Callback):
    """Copies every gradient at each optimizer step (placed after the ReplayCallback: it sees the sum)."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor | None]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: None if p.grad is None else p.grad.detach().clone()
                           for n, p in pl_module.named_parameters()})


def _rows(stored, data):
    """Index in ``data`` of each stored row (-1 when it is not a row of ``data``)."""
    x = data.tensors[0].flatten(1)
    out = []
    for row in stored[0].flatten(1):
        hit = torch.nonzero((x == row).all(1)).flatten()
        out.append(int(hit[0]) if len(hit) else -1)
    return torch.tensor(out)


# --------------------------------------------------------------------------------------------------- the memory
@pytest.mark.parametrize("setting", ["task", "domain"])
def test_memory_holds_memory_per_task_examples_of_each_task_with_labels_and_task_ids(make_trainer, small_model,
                                                                                     setting):
    stream = synthetic_stream(num_tasks=2, n_train=48, n_test=8, setting=setting)
    model = small_model(hidden=(8,), num_tasks=2) if setting == "task" else nn.Sequential(
        nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 2))
    module = ClassifierModule(model, num_tasks=2)
    cb = ReplayCallback(memory_per_task=10)
    for t, task in enumerate(stream):
        make_trainer(cb).fit(module, loader(task.train))
        assert cb.tasks_seen == t + 1 and sorted(cb.memory) == list(range(t + 1))
    assert len(cb) == 20
    for t, task in enumerate(stream):
        stored = cb.memory[t]
        assert len(stored) == (3 if setting == "task" else 2) and all(len(s) == 10 for s in stored)
        idx = _rows(stored, task.train)
        assert (idx >= 0).all() and len(idx.unique()) == 10  # distinct rows of this task's own data
        for k in range(1, len(stored)):  # labels (and task ids) are those of the rows
            assert torch.equal(stored[k], task.train.tensors[k][idx])
        if setting == "task":
            assert (stored[2] == t).all()


def test_reservoir_for_data_without_a_length():
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(50):
                yield torch.tensor([float(i)]), torch.tensor(i % 3)

    cb = ReplayCallback(memory_per_task=7, seed=3)
    x, y = cb.add_task_data(DataLoader(Stream(), batch_size=8))
    assert x.shape == (7, 1) and len(x.unique()) == 7 and torch.equal(y, x[:, 0].long() % 3)
    x2, _ = ReplayCallback(memory_per_task=7, seed=3).add_task_data(DataLoader(Stream(), batch_size=8))
    assert torch.equal(x, x2)  # seeded


def test_small_task_is_stored_whole_with_a_warning():
    data = TensorDataset(torch.randn(5, 3), torch.arange(5))
    cb = ReplayCallback(memory_per_task=8)
    with pytest.warns(UserWarning, match="fewer than memory_per_task=8"):
        _, y = cb.add_task_data(data)
    assert sorted(y.tolist()) == [0, 1, 2, 3, 4]


def test_forget_drops_a_task_from_replay():
    cb = ReplayCallback(memory_per_task=4, replay_batch_size=100)
    cb.add_task_data(TensorDataset(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long)), task=0)
    cb.add_task_data(TensorDataset(torch.ones(10, 2), torch.ones(10, dtype=torch.long)), task=1)
    assert sorted(cb.replay_batch(0, 2)[1].tolist()) == [0] * 4 + [1] * 4
    cb.forget(0)
    assert cb.replay_batch(0, 2)[1].tolist() == [1] * 4
    with pytest.raises(KeyError, match="task 0 has no memory"):
        cb.forget(0)


# --------------------------------------------------------------------------------------------------- the gradient
@pytest.mark.parametrize("loss,accumulate", [("training_step", 1), ("cross_entropy", 1), ("training_step", 2)])
def test_gradient_is_autograd_of_task_loss_plus_replay_loss(make_trainer, small_model, loss, accumulate):
    stream = synthetic_stream(num_tasks=2, n_train=32, n_test=8)
    module = ClassifierModule(small_model(hidden=(8,), num_tasks=2), num_tasks=2)
    cb = ReplayCallback(memory_per_task=12, replay_batch_size=5, loss=loss)
    make_trainer(cb).fit(module, loader(stream[0].train))
    before = copy.deepcopy(module)
    rec = GradRecorder()
    make_trainer(cb, extra=(rec,), max_steps=1, accumulate_grad_batches=accumulate).fit(module,
                                                                                        loader(stream[1].train, 8))
    assert len(rec.grads) == 1
    # by hand: the mean of the micro-batches' losses (Lightning divides each by k) plus the replay minibatch's loss
    x, y, t = stream[1].train.tensors
    task_loss = sum(F.cross_entropy(before(x[8 * i: 8 * i + 8], t[8 * i: 8 * i + 8]), y[8 * i: 8 * i + 8])
                    for i in range(accumulate)) / accumulate
    cb.forget(1)  # the fit committed task 1 (one step); the step drew from task 0's memory alone
    rx, ry, rt = cb.replay_batch(step=0, task=1)
    assert len(ry) == 5 and (rt == 0).all()
    replay_loss = F.cross_entropy(before(rx, rt), ry)
    names = [n for n, p in before.named_parameters()]
    expected = torch.autograd.grad(task_loss + replay_loss, list(before.parameters()), allow_unused=True)
    for n, g in zip(names, expected):
        got = rec.grads[0][n]
        if g is None:
            assert got is None, n
        else:
            torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-7, msg=n)
    # task 0's head gets its gradient from the replay batch alone (the task batch routes to head 1)
    assert rec.grads[0]["model.heads.0.weight"].abs().sum() > 0
    torch.testing.assert_close(cb.last_replay_loss, replay_loss.detach())


def test_no_replay_on_the_first_task(make_trainer, small_model):
    stream = synthetic_stream(num_tasks=1, n_train=16, n_test=8)
    module = ClassifierModule(small_model(hidden=(8,), num_tasks=1), num_tasks=1)
    cb = ReplayCallback(memory_per_task=4)
    make_trainer(cb, max_steps=1).fit(module, loader(stream[0].train))
    assert cb.last_replay_loss is None and cb.tasks_seen == 1 and list(cb.memory) == [0]
    assert ReplayCallback().replay_batch(0, 0) is None


# --------------------------------------------------------------------------------------------------- task boundaries
@pytest.mark.filterwarnings("ignore:.*max_epochs counts across fits")
def test_new_trainer_per_task_and_one_reused_trainer_agree(make_trainer, small_model, assert_bitwise_equal):
    stream = synthetic_stream(num_tasks=3, n_train=32, n_test=8)
    runs = []
    for reuse in (False, True):
        module = ClassifierModule(small_model(hidden=(8,), num_tasks=3), num_tasks=3)
        cb = ReplayCallback(memory_per_task=6, replay_batch_size=4)
        trainer = make_trainer(cb)
        for task in stream:
            if not reuse:
                trainer = make_trainer(cb)
            trainer.fit(module, loader(task.train))
        runs.append((cb, module))
    (cb_a, mod_a), (cb_b, mod_b) = runs
    assert cb_a.tasks_seen == cb_b.tasks_seen == 3
    assert_bitwise_equal({t: list(m) for t, m in cb_a.memory.items()}, {t: list(m) for t, m in cb_b.memory.items()})
    for (n, p), q in zip(mod_a.named_parameters(), mod_b.parameters()):
        torch.testing.assert_close(p, q, msg=n)  # the same training: each task its full budget, the same replays


def test_checkpoint_round_trip_resumes_the_next_task_as_if_never_stopped(make_trainer, small_model, tmp_path,
                                                                         assert_bitwise_equal):
    stream = synthetic_stream(num_tasks=3, n_train=32, n_test=8)

    def run(upto, module, cb):
        for task in list(stream)[:upto]:
            make_trainer(cb).fit(module, loader(task.train))

    full_mod = ClassifierModule(small_model(hidden=(8,), num_tasks=3), num_tasks=3)
    full = ReplayCallback(memory_per_task=6)
    run(3, full_mod, full)

    mod = ClassifierModule(small_model(hidden=(8,), num_tasks=3), num_tasks=3)
    cb = ReplayCallback(memory_per_task=6)
    trainer = make_trainer(cb)
    for task in list(stream)[:2]:
        trainer = make_trainer(cb)
        trainer.fit(mod, loader(task.train))
    trainer.save_checkpoint(tmp_path / "after-2.ckpt")
    ckpt = torch.load(tmp_path / "after-2.ckpt", weights_only=False)
    assert sorted(ckpt[f"replay/{cb.state_key}"]) == [0, 1]
    assert resume_point(tmp_path / "after-2.ckpt").task == 2

    # a fresh process: new module, new callback, the checkpoint passed to the fit of task 2
    mod2 = ClassifierModule(small_model(hidden=(8,), num_tasks=3, seed=5), num_tasks=3)
    cb2 = ReplayCallback(memory_per_task=6)
    make_trainer(cb2).fit(mod2, loader(stream[2].train), ckpt_path=tmp_path / "after-2.ckpt")
    assert cb2.tasks_seen == 3
    assert_bitwise_equal({t: list(m) for t, m in cb2.memory.items()}, {t: list(m) for t, m in full.memory.items()})
    for (n, p), q in zip(mod2.named_parameters(), full_mod.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_resume_inside_a_task_replays_the_same_batches(make_trainer, small_model, tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from bayescl.lightning.resumable import ResumableDataLoader

    stream = synthetic_stream(num_tasks=2, n_train=32, n_test=8)

    def fit(module, cb, task, extra=(), ckpt_path=None):
        make_trainer(cb, extra=extra, enable_checkpointing=bool(extra)).fit(
            module, ResumableDataLoader(stream[task].train, batch_size=8, shuffle=True), ckpt_path=ckpt_path)

    full_mod = ClassifierModule(small_model(hidden=(8,), num_tasks=2), num_tasks=2)
    full = ReplayCallback(memory_per_task=6, replay_batch_size=4)
    fit(full_mod, full, 0)
    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    fit(full_mod, full, 1, extra=(ck,))  # 4 steps; a checkpoint after step 2, inside task 1
    mid = tmp_path / "epoch=0-step=2.ckpt"
    assert resume_point(mid).finishes_task and resume_point(mid).task == 1

    mod = ClassifierModule(small_model(hidden=(8,), num_tasks=2, seed=3), num_tasks=2)
    cb = ReplayCallback(memory_per_task=6, replay_batch_size=4)
    fit(mod, cb, 1, ckpt_path=mid)  # a fresh process finishes task 1 from its step 2
    assert cb.tasks_seen == 2 and sorted(cb.memory) == [0, 1]
    for (n, p), q in zip(mod.named_parameters(), full_mod.parameters()):
        torch.testing.assert_close(p, q, msg=n)


# --------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,exc,match", [
    ({"memory_per_task": 0}, ValueError, "memory_per_task=0 is not allowed"),
    ({"memory_per_task": 2.5}, TypeError, "memory_per_task must be an int"),
    ({"replay_batch_size": 0}, ValueError, "replay_batch_size=0 is not allowed"),
    ({"loss": "mse"}, ValueError, "loss='mse' is not valid; allowed: 'training_step', 'cross_entropy'"),
    ({"loss": 3}, TypeError, "loss must be 'training_step' or 'cross_entropy' or a callable"),
    ({"seed": -1}, ValueError, "seed=-1 is not allowed"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ReplayCallback(**kwargs)


def test_training_step_loss_is_refused_with_manual_optimization(make_trainer):
    class Manual(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.lin = nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(8, 2), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="loss='training_step' would step the optimizers"):
        make_trainer(ReplayCallback(memory_per_task=2)).fit(Manual(), loader(data))


def test_mixed_batch_conventions_are_refused():
    cb = ReplayCallback(memory_per_task=2)
    cb.add_task_data(TensorDataset(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), task=0)
    with pytest.raises(ValueError, match="different lengths"):
        cb.add_task_data(TensorDataset(torch.randn(4, 2), torch.zeros(4, dtype=torch.long),
                                       torch.ones(4, dtype=torch.long)), task=1)


# --------------------------------------------------------------------------------------------------- forgetting
def _class_il(seed, n):
    """2 tasks of class-incremental Gaussian blobs in 10 dimensions: classes 0/1, then 2/3, one 4-way head."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, 10, generator=torch.Generator().manual_seed(99))  # the same classes in train and test
    tasks = []
    for c in ((0, 1), (2, 3)):
        y = torch.tensor(c)[torch.randint(0, 2, (n,), generator=g)]
        tasks.append(TensorDataset(means[y] + torch.randn(n, 10, generator=g), y))
    return tasks


def test_replay_reduces_forgetting_in_class_incremental_learning():
    train, test = _class_il(0, 256), _class_il(1, 200)
    acc = {}
    for name, cbs in (("naive", []), ("er", [ReplayCallback(memory_per_task=20)])):
        torch.manual_seed(0)
        module = ClassifierModule(nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)), num_tasks=2,
                                  lr=1e-2)
        for ds in train:
            pl.Trainer(max_epochs=2, callbacks=cbs, accelerator="cpu", devices=1, logger=False,
                       enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                       num_sanity_val_steps=0).fit(module, DataLoader(ds, batch_size=16, shuffle=True))
        with torch.no_grad():
            acc[name] = [float((module(*ds.tensors[:1]).argmax(-1) == ds.tensors[1]).float().mean()) for ds in test]
    # measured: naive [0.53, 0.985], er [0.995, 0.98] (task 0, task 1 after both tasks)
    assert acc["naive"][0] < 0.7  # class-IL fine-tuning forgets task 0
    assert acc["er"][0] > acc["naive"][0] + 0.3 and min(acc["er"][1], acc["naive"][1]) > 0.9


# --------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name,memory", [("er", 200), ("er-40", 40)])
def test_er_recipes_build_the_callback(name, memory):
    (cb,) = load_recipe(name).build_callbacks()
    assert isinstance(cb, ReplayCallback) and cb.memory_per_task == memory and cb.replay_batch_size is None
