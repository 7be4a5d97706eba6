"""PosteriorServerStrategy: posterior-server algebra, multi-process runs (gloo, 2 CPU processes) and failures.

Multi-process runs are subprocesses of this very file (``python tests/lightning/test_strategy.py MODE OUT``; Lightning's
``popen`` launcher re-runs it for rank 1), each in its own session and killed as a group afterwards, with a
timeout, so pytest itself stays single-process and never hangs.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

ROOT = Path(__file__).resolve().parents[2]
HIDDEN, LR, BS, EPOCHS, K = (16,), 1e-2, 16, 2, 3


# plain functions, not the conftest fixtures (make_trainer, small_model): the subprocess entry point below runs them
# without pytest, each worker in its own process
def _data(task: int = 0):
    from bayescl import synthetic_stream

    return synthetic_stream(num_tasks=2, n_train=64, n_test=16, seed=0)[task].train


def _module():
    from bayescl import ClassifierModule, MultiHeadMLP

    torch.manual_seed(0)
    return ClassifierModule(MultiHeadMLP(hidden=HIDDEN, num_tasks=2), num_tasks=2, lr=LR)


def _informative_prior(module):
    """A prior with a real pull (precision 5 around a random mean), so that the cavity term matters."""
    from bayescl.gaussian.diag import DiagGaussian

    g = torch.Generator().manual_seed(1)
    shapes = {n: p.detach() for n, p in module.named_parameters()}
    return DiagGaussian.from_mean_precision({n: 0.1 * torch.randn(t.shape, generator=g) for n, t in shapes.items()},
                                            {n: torch.full_like(t, 5.0) for n, t in shapes.items()})


# ================================================================================ subprocess entry point
def _trainer(strategy, devices):
    import pytorch_lightning as pl

    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_epochs=EPOCHS, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)


def _strategy(**kw):
    from bayescl.lightning.strategy import PosteriorServerStrategy

    # lam=1 on the raw curvature: the references below are the unscaled Laplace site (the defaults are tested apart)
    return PosteriorServerStrategy(sync_every=K, fisher="exact", lam=1.0, normalize=False, timeout=timedelta(seconds=30),
                                   process_group_backend="gloo", **kw)


def _main(mode: str, out: Path) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    module = _module()
    if mode == "fail":
        orig = module.training_step

        def failing_step(batch, batch_idx):
            if module.global_rank == 1 and module.global_step >= 1:
                raise RuntimeError("worker 1 failed on purpose")
            return orig(batch, batch_idx)

        module.training_step = failing_step
    import pytorch_lightning as pl
    import torch.distributed as dist

    calls = {"all_reduce": []}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls["all_reduce"].append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce  # the strategy calls dist.all_reduce through the module attribute

    class Wrapped(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            calls["model"] = type(trainer.strategy.model).__name__

    devices = 1 if mode == "one" else 2
    s1 = _strategy(auto_end_task=False, gather_sites=mode != "one",
                   prior=_informative_prior(module) if mode == "one" else None)
    trainer = _trainer(s1, devices)
    trainer.callbacks.append(Wrapped())
    trainer.fit(module, DataLoader(_data(0), batch_size=BS))
    rank = s1.global_rank
    rec = {"calls": {k: list(v) if isinstance(v, list) else v for k, v in calls.items()}, "own": s1.local_site.state_dict(), "running": s1.posterior().state_dict(), "stats0": s1.stats(),
           "prior": s1.server.prior.state_dict(), "shard": s1._shard_size}
    q1 = s1.end_task()
    rec.update(q1=q1.state_dict(), server1=s1.server.state_dict(), drift=s1.last_gather_drift,
               weights1={n: p.detach().clone() for n, p in module.named_parameters()})
    if mode == "two":  # a second task, starting from the first one's (task, worker) sites
        s2 = _strategy(prior=s1.server)
        _trainer(s2, devices).fit(module, DataLoader(_data(1), batch_size=BS))
        rec.update(server2=s2.server.state_dict(), q2=s2.posterior().state_dict(), stats2=s2.stats(),
                   weights2={n: p.detach().clone() for n, p in module.named_parameters()})
    torch.save(rec, out / f"rank{rank}.pt")


def _start(start_job, mode: str, out: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    out.mkdir(parents=True, exist_ok=True)
    return start_job([sys.executable, str(Path(__file__).resolve()), mode, str(out)], out / f"{mode}.log", env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, start_job):
    """The three multi-process runs, started together (they spend most of their time importing) with one
    deadline; each result is ``(returncode or None if it hung, log text, output folder)``."""
    modes = ("one", "two", "fail")
    outs = {m: tmp_path_factory.mktemp(m) for m in modes}
    started = {m: _start(start_job, m, outs[m]) for m in modes}
    deadline = time.monotonic() + 150.0
    return {m: (*started[m].finish(deadline)[:2], outs[m]) for m in modes}


def _result(runs, mode: str, ok: bool = True):
    rc, text, out = runs[mode]
    assert rc is not None, f"run '{mode}' hung past the deadline:\n{text[-3000:]}"
    if ok:
        assert rc == 0, text[-3000:]
    return rc, text, out


# ================================================================================ in-process tests
def test_flatten_roundtrip_and_laplace_site_is_local_posterior_over_cavity():
    from bayescl.gaussian.diag import DiagGaussian
    from bayescl.lightning.strategy import flatten_naturals, laplace_site, unflatten_naturals

    torch.manual_seed(0)
    like = {"a": torch.randn(2, 3, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    cav = DiagGaussian.from_mean_precision(like, {n: torch.rand_like(t) + 0.5 for n, t in like.items()})
    vec = flatten_naturals(cav)
    assert vec.shape == (20,)
    back = unflatten_naturals(vec, cav)
    for n in like:
        assert torch.equal(back.eta[n], cav.eta[n]) and torch.equal(back.precision[n], cav.precision[n])
    theta = {n: torch.randn_like(t) for n, t in like.items()}
    curv = {n: torch.rand_like(t) for n, t in like.items()}
    curv["b"][0] = 0.0  # a zero-curvature entry: the site is improper there
    site = laplace_site(cav, theta, curv)
    local = (cav * site).mean
    ref = (cav * DiagGaussian.from_mean_precision(theta, {n: c + 0 for n, c in curv.items()}))
    for n in like:  # cavity × site = N(θ, cavity precision + C)
        torch.testing.assert_close(local[n], theta[n])
        torch.testing.assert_close((cav * site).precision[n], ref.precision[n])


def test_bad_arguments_raise_one_sentence():
    from bayescl.lightning.strategy import PosteriorServerStrategy

    with pytest.raises(ValueError, match="sync_every"):
        PosteriorServerStrategy(sync_every=0)
    with pytest.raises(ValueError, match="damping"):
        PosteriorServerStrategy(damping=1.5)
    with pytest.raises(ValueError, match="fisher"):
        PosteriorServerStrategy(fisher="batch_squared")
    with pytest.raises(TypeError, match="prior"):
        PosteriorServerStrategy(prior={"w": torch.zeros(1)})
    with pytest.raises(TypeError, match="timeout"):
        PosteriorServerStrategy(timeout=60)
    with pytest.raises(ValueError, match="lam"):
        PosteriorServerStrategy(lam=0.0)


def test_lam_scales_the_local_curvature_like_the_callbacks():
    """shard_curvature with lam = lam × the Fisher of the shard (N_k / n_b × the summed diagonal Fisher)."""
    from bayescl.curvature import diag_fisher
    from bayescl.lightning.strategy_sites import shard_curvature

    module = _module()
    batches = list(DataLoader(_data(), batch_size=BS))[:2]
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    plain = shard_curvature(module, batches, names, "exact", 1, seed=0, shard=64)
    scaled = shard_curvature(module, batches, names, "exact", 1, seed=0, shard=64, lam=30.0)
    dense = diag_fisher(module, batches, fisher="exact", params=names)
    for n in names:
        torch.testing.assert_close(plain[n], dense[n] * 64 / (2 * BS))
        torch.testing.assert_close(scaled[n], 30.0 * plain[n])
    from bayescl.lightning.strategy import PosteriorServerStrategy

    local = {}
    for lam in (1.0, 30.0):  # the strategy's own path: its buffered batches, its shard size and its lam
        strategy = PosteriorServerStrategy(fisher="exact", lam=lam, normalize=False)
        strategy._buffer.extend(batches)
        strategy._shard_size = 64
        local[lam] = strategy.local_curvature(module)
    for n in names:
        torch.testing.assert_close(local[1.0][n], plain[n])
        torch.testing.assert_close(local[30.0][n], scaled[n])


def test_prior_of_the_next_task_from_a_posterior_or_a_server():
    from bayescl.gaussian.diag import DiagGaussian
    from bayescl.gaussian.server import PosteriorServer, SiteKey
    from bayescl.lightning.strategy import PosteriorServerStrategy

    module = _module()
    q = DiagGaussian.isotropic(module, 2.0)
    s = PosteriorServerStrategy(prior=q)
    server = s._ensure_server(module)
    assert len(server) == 0 and s.tasks_seen == 0
    torch.testing.assert_close(server.posterior().precision["model.trunk.1.weight"],
                               q.precision["model.trunk.1.weight"])
    prev = PosteriorServer(DiagGaussian.isotropic(module, 1e-4))
    for name in (SiteKey(0, 0), SiteKey(0, 1), SiteKey(1), "from-a-callback"):  # keys are data, never parsed
        prev.add(name, DiagGaussian.zeros_like(module))
    s = PosteriorServerStrategy(prior=prev)
    assert list(s._ensure_server(module).names) == list(prev.names) and s.tasks_seen == 2
    assert (s.own_key, s.others_key) == (SiteKey(2, 0), SiteKey(2, 0, others=True))
    assert str(s.own_key) == "task-2/worker-0" and s.local_site is None
    with pytest.raises(ValueError, match="select"):
        PosteriorServerStrategy(prior=q, params=["heads"])._ensure_server(module)


def _reference_one_worker() -> tuple[dict, dict]:
    """The same run in plain torch with a PosteriorServer: Adam, cavity term / N, Laplace site every K steps."""
    from bayescl.curvature.diag import diag_fisher
    from bayescl.gaussian.diag import DiagGaussian
    from bayescl.gaussian.server import PosteriorServer

    module = _module()
    params = dict(module.named_parameters())
    opt = torch.optim.Adam(module.parameters(), lr=LR)
    server = PosteriorServer(_informative_prior(module))
    server.add("w", DiagGaussian.zeros_like(module))
    # Lightning gives every rank a shuffled DistributedSampler (seed PL_GLOBAL_SEED=0, set_epoch each epoch)
    sampler = DistributedSampler(_data(0), num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(_data(0), batch_size=BS, sampler=sampler)
    n_k = len(loader.dataset)
    buf, steps = [], 0

    def sync():
        theta = {n: p.detach().clone() for n, p in params.items()}
        cav = server.cavity("w")
        batches = buf[-2:]
        fisher = diag_fisher(module, batches, fisher="exact")
        scale = n_k / sum(len(b[1]) for b in batches)
        curv = DiagGaussian.from_mean_precision(theta, {n: f * scale for n, f in fisher.items()})
        server.update("w", (cav * curv).with_mean(theta).divide(cav, allow_improper=True))
        with torch.no_grad():
            for n, m in server.posterior().mean.items():
                params[n].copy_(m)
        buf.clear()

    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for x, y, t in loader:
            opt.zero_grad()
            F.cross_entropy(module(x, t), y).backward()
            g = server.cavity("w").quadratic_grad({n: p.detach() for n, p in params.items()})
            with torch.no_grad():
                for n, p in params.items():
                    if p.grad is None:  # a head this batch did not use
                        p.grad = torch.zeros_like(p)
                    p.grad.add_(g[n] / n_k)
            opt.step()
            buf.append((x, y, t))
            steps += 1
            if steps % K == 0:
                sync()
    if buf:
        sync()
    return server.posterior().state_dict(), server["w"].state_dict()


def test_one_worker_equals_single_process_computation(runs):
    _, _, out = _result(runs, "one")
    rec = torch.load(out / "rank0.pt", weights_only=False)
    assert rec["shard"] == 64 and rec["stats0"]["world_size"] == 1 and rec["stats0"]["damping"] == 1.0
    assert rec["stats0"]["num_syncs"] == 3  # steps 3, 6 and the last one (8 steps of 16 examples)
    assert rec["stats0"]["bytes_communicated"] == 0 and not [n for n in rec["calls"]["all_reduce"] if n > 1]
    q_ref, site_ref = _reference_one_worker()
    for key in ("eta", "precision"):
        for n, t in q_ref[key].items():
            torch.testing.assert_close(rec["q1"][key][n], t, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(rec["own"][key][n], site_ref[key][n], rtol=1e-4, atol=1e-5)
    assert list(rec["server1"]["sites"]) == ["task-0"]  # gather_sites=False: one site per task
    for n, w in rec["weights1"].items():  # re-centred on the posterior mean
        torch.testing.assert_close(w, rec["q1"]["eta"][n] / rec["q1"]["precision"][n])


def test_two_workers_global_posterior_is_prior_plus_sum_of_sites(runs):
    _, _, out = _result(runs, "two")
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["shard"] == r1["shard"] == 32  # DistributedSampler: half of 64 each
    s = r0["stats0"]
    assert s["world_size"] == 2 and s["damping"] == 0.5 and s["num_syncs"] == 2  # 4 steps: step 3 and the last
    n_params = sum(t.numel() for t in r0["prior"]["eta"].values())
    assert s["bytes_communicated"] == s["num_syncs"] * 2 * n_params * 4
    for r in (r0, r1):  # no DDP wrapper, no gradient all-reduce: one 2P-float all-reduce per sync, the rest are
        assert r["calls"]["model"] == "ClassifierModule"  # Lightning's scalar stop decisions
        assert [n for n in r["calls"]["all_reduce"] if n > 1] == [2 * n_params] * s["num_syncs"]
    for key in ("eta", "precision"):
        for n in r0["prior"][key]:
            # the running posterior of each rank = prior + the sites that each rank held itself (all-reduce sum)
            total = r0["prior"][key][n] + r0["own"][key][n] + r1["own"][key][n]
            for r in (r0, r1):
                torch.testing.assert_close(r["running"][key][n], total, rtol=1e-5, atol=1e-5)
            # after end_task: identical on every rank, and equal to prior + Σ (task, worker) sites exactly
            assert torch.equal(r0["q1"][key][n], r1["q1"][key][n])
            assert torch.equal(r0["q2"][key][n], r1["q2"][key][n])
            for rec, qk, srv in ((r0, "q1", "server1"), (r0, "q2", "server2")):
                sites = rec[srv]["sites"]
                summed = rec[srv]["prior"][key][n] + sum(v[key][n] for v in sites.values())
                torch.testing.assert_close(rec[qk][key][n], summed, rtol=1e-6, atol=1e-6)
    assert list(r0["server1"]["sites"]) == ["task-0/worker-0", "task-0/worker-1"]
    assert list(r0["server2"]["sites"]) == ["task-0/worker-0", "task-0/worker-1", "task-1/worker-0",
                                            "task-1/worker-1"]
    for n in r0["server1"]["sites"]["task-0/worker-1"]["eta"]:  # rank 1's site reached rank 0 unchanged
        assert torch.equal(r0["server1"]["sites"]["task-0/worker-1"]["eta"][n], r1["own"]["eta"][n])
    for n, w in r0["weights2"].items():  # both ranks end on the global mean
        assert torch.equal(w, r1["weights2"][n])
        torch.testing.assert_close(w, r0["q2"]["eta"][n] / r0["q2"]["precision"][n])
    assert r0["stats2"]["bytes_gathered"] == 2 * 2 * n_params * 4


def test_a_failing_worker_fails_the_run_without_hanging(runs):
    rc, text, out = _result(runs, "fail", ok=False)
    assert rc != 0
    assert "worker 1 failed on purpose" in text, text[-3000:]
    # rank 0 is not left waiting in the all-reduce: gloo sees the closed connection (or Lightning's child-process
    # observer kills it); the collective timeout (30 s here) is the last resort
    assert not (out / "rank0.pt").exists()


if __name__ == "__main__":
    _main(sys.argv[1], Path(sys.argv[2]))
