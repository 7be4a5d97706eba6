"""One node of a 2-node × 1-process DDP run on loopback: LaplaceCallback (diag, kron) fits two tasks.

Start it once per node, by hand or from ``test_multinode.py``, with the same ``MASTER_PORT``::

    export MASTER_ADDR=127.0.0.1 MASTER_PORT=29531
    NODE_RANK=1 python tests/lightning/multinode_job.py OUT diag kron &
    NODE_RANK=0 python tests/lightning/multinode_job.py OUT diag kron

Each process is a whole node (``Trainer(accelerator="cpu", devices=1, num_nodes=2)``): Lightning's environment reads
``NODE_RANK``, its launcher starts no other process (one device per node), and the global rank is ``NODE_RANK``.
The data, model and callbacks are ``ddp_callbacks_job.py``'s; the unshuffled ``DistributedSampler`` takes its rank
from ``NODE_RANK`` (``LOCAL_RANK`` is 0 on both nodes), so the union of the two nodes' k-th batches is the k-th batch
of ``ddp_callbacks_job.py 1 ...`` (the one-process reference). Every node saves ``OUT/<method>-node<r>.pt`` in the
layout of ``ddp_callbacks_job.py`` (the server after each task, the weights, N_t). ``BAYESCL_TEST_NO_REDUCE=1``
removes the curvature all-reduce, as there.
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_callbacks_job as job  # the job module next to this file (not a test module)

NUM_NODES = 2
METHODS = ("diag", "kron")


def make_trainer(callbacks: list):
    """A Trainer for one node of ``NUM_NODES``: one CPU process, gloo, a bounded collective timeout."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    # find_unused_parameters: the multi-head model leaves the other task's head unused
    strategy = DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", timeout=timedelta(seconds=60))
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, num_nodes=NUM_NODES, max_epochs=job.EPOCHS,
                      logger=False, precision="64-true", enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                      use_distributed_sampler=False)


def loader(data, node_rank: int) -> DataLoader:
    """Unshuffled, ``job.BS`` per node and step: node ``r`` takes examples ``r, r + 2, …``."""
    sampler = DistributedSampler(data, num_replicas=NUM_NODES, rank=node_rank, shuffle=False)
    return DataLoader(data, batch_size=job.BS, sampler=sampler)


def run(method: str, out: Path) -> None:
    """Fit the two tasks with ``method``'s LaplaceCallback and save this node's record."""
    node_rank = int(os.environ["NODE_RANK"])
    module, cb = job.make_module(), job.make_callback(method)
    record: dict = {"servers": []}
    for task in range(2):
        trainer = make_trainer([cb])
        trainer.fit(module, loader(job.task_data(task, method), node_rank))
        if (trainer.global_rank, trainer.world_size, trainer.num_nodes) != (node_rank, NUM_NODES, NUM_NODES):
            raise RuntimeError(f"not one node of {NUM_NODES}: global rank {trainer.global_rank}, world size "
                               f"{trainer.world_size}, {trainer.num_nodes} nodes, NODE_RANK={node_rank}")
        record["servers"].append(cb.server.state_dict())
        record[f"num_examples{task}"] = cb.num_examples
    record["weights"] = {n: p.detach().clone() for n, p in module.named_parameters()}
    torch.save(record, out / f"{method}-node{node_rank}.pt")


def main(out: Path, methods: list[str]) -> None:
    warnings.filterwarnings("ignore")
    if os.environ.get("BAYESCL_TEST_NO_REDUCE") == "1":  # as in ddp_callbacks_job.py: to see the test fail
        from bayescl.lightning import laplace

        laplace.sum_across_ranks = list  # each node keeps its own half of the curvature
    out.mkdir(parents=True, exist_ok=True)
    for method in methods:
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}: one of {METHODS}")
        run(method, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or list(METHODS))
