"""The job of ``test_ddp_callbacks.py``: fit two tasks with LaplaceCallback (diag, kron), VCLCallback, ReplayCallback
and FunctionalPriorCallback, in DDP.

``python tests/lightning/ddp_callbacks_job.py DEVICES OUT [METHOD ...]`` (methods: :data:`METHODS`): with ``DEVICES=2`` Lightning's DDP launcher
re-runs this file for rank 1 (gloo, CPU); with ``DEVICES=spawn`` two processes are spawned (``ddp_spawn``: the
callback and module are pickled into them, and this process reads the posterior back after each fit, its record
saved as ``<method>-spawn.pt``); with ``DEVICES=1`` it is the one-process reference on the same data with
the same *global* batch (``2 * BS``): with an unshuffled ``DistributedSampler`` rank ``r`` takes examples
``r, r + 2, …``, so the union of the two ranks' k-th batches is the k-th batch of the one-process run. Every rank
saves ``OUT/<method>-rank<r>.pt`` (the server's state after each task, the weights, the coresets, replay's memory
after each task, FROMP's function sites after each task); the two-process
run also writes a ``last.ckpt`` per task under ``OUT/ckpt-<method>-<task>``. ``BAYESCL_TEST_NO_REDUCE=1`` replaces
the curvature all-reduce by the identity (to see the test fail).

"replay" runs with ``replay_batch_size=None`` under DDP (the documented default: one rank's batch size, ``BS``) and
with ``BS`` in the one-process reference, whose loader's batch is the two ranks' union (``2 * BS``).
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

#: MEMORY > BS: the replay batch (one rank's batch, BS by default) is then smaller than the memory
BS, EPOCHS, HIDDEN, N_TRAIN, CORESET, MEMORY = 8, 2, (8,), 32, 4, 12
#: "vcl" trains without weight noise (comparable with one process); "vcl-noisy" as users do (DDP only)
#: "functional-skewed" (DDP only): FROMP with rank 1's memorability scores negated, a stand-in for a rank whose
#: numbers differ (non-deterministic kernels): without rank 0's site on every rank, rank 1 would pick other points
METHODS = ("diag", "kron", "vcl", "vcl-noisy", "replay", "functional", "functional-skewed", "functional-random")


def numbers_only(state):
    """``state`` without the ``tag`` of Kronecker terms (random identifiers drawn per process, not numbers)."""
    if isinstance(state, dict):
        return {k: numbers_only(v) for k, v in state.items() if k != "tag"}
    if isinstance(state, (list, tuple)):
        return [numbers_only(v) for v in state]
    return state


def load_numbers(path: Path) -> dict:
    """A record a job saved, without the Kronecker terms' tags."""
    return numbers_only(torch.load(path, weights_only=False))


def task_data(task: int, method: str):
    """A task's training set: ``N_TRAIN`` examples (after VCL's coreset is held out: ``N_TRAIN + CORESET``)."""
    from bayescl import synthetic_stream

    n = N_TRAIN + (CORESET if method.startswith("vcl") else 0)
    return synthetic_stream(num_tasks=2, n_train=n, n_test=4, seed=0)[task].train


def make_module():
    from bayescl import ClassifierModule, MultiHeadMLP

    torch.manual_seed(0)
    return ClassifierModule(MultiHeadMLP(hidden=HIDDEN, num_tasks=2), num_tasks=2, lr=1e-2)


def make_callback(method: str, devices: int | str = 2):
    from bayescl import LaplaceCallback, VCLCallback
    from bayescl.lightning.functional import FunctionalPriorCallback
    from bayescl.lightning.replay import ReplayCallback

    if method == "replay":
        return ReplayCallback(memory_per_task=MEMORY, replay_batch_size=BS if devices == 1 else None)
    if method.startswith("functional"):  # tau = N_t: the functional gradient is as large as the task's (the test sees it)
        return FunctionalPriorCallback(memory_size=MEMORY, points_per_step=4, tau=float(N_TRAIN), structure="diag",
                                       # the Hessian scores are computed on every rank (the harder case); "-random": the
                                       # callback's default selection
                                       **({} if method == "functional-random" else {"selection": "hessian"}),
                                       predictive_prior_precision="train")
    if method.startswith("vcl"):
        return VCLCallback(coreset_size=CORESET, coreset_epochs=0, test_samples=1)
    # the exact Fisher: no sampled labels, so the two-process pass sums the same terms as the one-process one
    return LaplaceCallback(structure=method, fisher="exact", predictive_prior_precision="train")


def make_trainer(devices: int | str, callbacks: list, ckpt_dir: Path | None, precision: str):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import DDPStrategy

    if ckpt_dir is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)]
    spawn = devices == "spawn"
    strategy = (DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", timeout=timedelta(seconds=60),
                            start_method="spawn" if spawn else "popen")
                if spawn or devices > 1 else "auto")  # the multi-head model leaves the other task's head unused
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=2 if spawn else devices, max_epochs=EPOCHS,
                      logger=False, precision=precision, enable_checkpointing=ckpt_dir is not None,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=callbacks, use_distributed_sampler=False)


def _set_stochastic(module, on: bool) -> None:
    from bayescl.methods.variational import set_stochastic

    set_stochastic(module, on)


def _no_noise(module, on: bool) -> None:
    _set_stochastic(module, False)


class RankShard(Sampler):
    """Indices ``rank, rank + world, …`` of the process group the iterating worker belongs to (what an unshuffled
    ``DistributedSampler`` gives, for a loader pickled into ``ddp_spawn`` workers before they have a rank)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        import torch.distributed as dist

        return iter(range(dist.get_rank(), self.n, dist.get_world_size()))

    def __len__(self) -> int:
        return self.n // 2


def loader(data, devices: int | str) -> DataLoader:
    """Unshuffled: in DDP an explicit ``DistributedSampler(shuffle=False)`` (Lightning's own would shuffle), built
    before the process group exists, from the rank Lightning's launcher puts in ``LOCAL_RANK``."""
    if devices == "spawn":  # built before the workers exist: the shard is chosen when the worker iterates
        return DataLoader(data, batch_size=BS, sampler=RankShard(len(data)))
    if devices == 1:
        return DataLoader(data, batch_size=2 * BS, shuffle=False)
    sampler = DistributedSampler(data, num_replicas=devices, rank=int(os.environ.get("LOCAL_RANK", "0")), shuffle=False)
    return DataLoader(data, batch_size=BS, sampler=sampler)


def _skewed_collect(model, batches):
    import torch.distributed as dist

    from bayescl.methods.functional import collect

    inputs, y, score = collect(model, batches)
    return inputs, y, (-score if dist.get_rank() == 1 else score)


def run(method: str, devices: int | str, out: Path) -> None:
    from bayescl.lightning import functional, vcl
    from bayescl.methods.functional import collect

    functional.collect = _skewed_collect if method == "functional-skewed" else collect

    # The weight noise is drawn per rank, so no two-process run draws the one-process run's noise: "vcl" switches
    # it off (the layers use their means; the KL term, N_t and the task's site are what DDP changes).
    vcl.set_stochastic = _no_noise if method == "vcl" else _set_stochastic
    module, cb = make_module(), make_callback(method, devices)
    if devices == "spawn" and method.startswith("vcl"):
        from bayescl.methods.variational import convert

        convert(module, cb.logvar_init)  # ddp_spawn brings back only weights this process's model has
    if devices == "spawn" and not method.startswith("vcl"):
        # ddp_spawn loads the workers' weights into this module, in its dtype: float64 keeps them exact between tasks
        # (in float32, Adam turns the rounding of the old head's weights into steps of size lr)
        module = module.double()
    record: dict = {"servers": [], "memory": [], "sites": []}
    rank = 0
    for task in range(2):
        data = task_data(task, method)
        if method.startswith("vcl"):
            data = cb.prepare_task_data(data)
        ckpt = out / f"ckpt-{method}-{task}" if devices == 2 else None
        # float64 for Laplace (tight comparisons); VCL in float32 (its server does not follow a float64 module)
        trainer = make_trainer(devices, [cb], ckpt, "32-true" if method.startswith("vcl") else "64-true")
        trainer.fit(module, loader(data, devices))
        rank = trainer.global_rank
        if method == "replay":
            record["memory"].append({t: list(m) for t, m in cb.memory.items()})
            if task == 0:  # the first replay batch task 1 will add (step 0, the memory of task 0)
                record["replay_batch0"] = list(cb.replay_batch())
            else:  # not None: task 1 did replay
                record["last_replay_loss"] = cb.last_replay_loss
            continue
        record["servers"].append(cb.server.state_dict())
        record[f"num_examples{task}"] = cb.num_examples
        if method.startswith("functional"):
            record["sites"].append({k: s.state_dict() for k, s in cb.sites.items()})
            record[f"draws{task}"] = cb.draws
    record["weights"] = {n: p.detach().clone() for n, p in module.named_parameters()}
    if method.startswith("vcl"):
        from bayescl.methods.variational import logical_names

        record["coresets"] = {t: list(c) for t, c in cb.coresets.items()}
        record["posterior_mean"] = cb.posterior().mean
        record["logical_names"] = logical_names(module)
    torch.save(record, out / (f"{method}-spawn.pt" if devices == "spawn" else f"{method}-rank{rank}.pt"))


def main(devices: int | str, out: Path, methods: list[str]) -> None:
    warnings.filterwarnings("ignore")
    if os.environ.get("BAYESCL_TEST_NO_REDUCE") == "1":
        from bayescl.lightning import laplace

        laplace.sum_across_ranks = list  # each rank keeps its own half of the curvature
    for method in methods:
        run(method, devices, out)


if __name__ == "__main__":
    main(sys.argv[1] if sys.argv[1] == "spawn" else int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or list(METHODS))
