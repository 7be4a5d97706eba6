"""PosteriorServerStrategy's maths in one process: two workers (threads) exchange through a fake all-reduce /
all-gather, and every site, cavity and gradient is checked against a dense hand computation (float64).

Each check here fails if its piece of the algorithm is removed: the multi-worker damping (``δ = 1/W``), the cavity
gradient when ``W > 1``, the per-task sync counter that switches the cavity term on once another worker's site has
arrived, and the cavity's precision floor. The collectives are the strategy's only overridable calls
(``_all_reduce_sum``, ``_all_gather``); a worker that fails aborts the barrier, so no test can hang.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.plugins.environments import LightningEnvironment
from torch import nn

from bayescl.curvature import diag_fisher
from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.server import SiteKey
from bayescl.lightning.strategy import PosteriorServerStrategy

DT, WORLD, N_K, BS, P0 = torch.float64, 2, 40, 8, 1e-4


class Tiny(pl.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # pragma: no cover - Lightning is not run here
        x, y = batch
        return F.cross_entropy(self(x), y)


class FixedEnv(LightningEnvironment):
    """A cluster environment that says: world ``WORLD``, this rank (no process group, no global side effect)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self._rank = rank

    def world_size(self) -> int:
        return WORLD

    def global_rank(self) -> int:
        return self._rank


class FakeGroup:
    """all_reduce(SUM) / all_gather between threads, in rank order (as gloo's result is the same on every rank)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(WORLD, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * WORLD
        self.calls = 0

    def exchange(self, rank: int, vec: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = vec.clone()
        self.barrier.wait()
        out = [t.clone() for t in self.slots]
        self.barrier.wait()
        self.calls += rank == 0
        return out


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(BS, 4, generator=g, dtype=DT), torch.randint(0, 3, (BS,), generator=g)


def workers(**kw) -> tuple[list[tuple[PosteriorServerStrategy, Tiny]], FakeGroup]:
    group, out = FakeGroup(), []
    for r in range(WORLD):
        s = PosteriorServerStrategy(fisher="exact", num_examples=N_K, prior_precision=P0, lam=1.0, normalize=False,
                                    cluster_environment=FixedEnv(r), **kw)  # lam=1: the unscaled Fisher below
        module = Tiny(seed=r)  # different weights on each worker: the sites differ
        s.connect(module)
        s._all_reduce_sum = lambda vec, r=r: sum(group.exchange(r, vec))
        s._all_gather = lambda vec, r=r: group.exchange(r, vec)
        s.open_task(module)
        out.append((s, module))
    return out, group


def on_both(ws, fn, group: FakeGroup) -> list:
    """``fn(strategy, module, rank)`` on every worker at once (threads); a failure aborts the barrier."""

    def run(r):
        try:
            return fn(*ws[r], r)
        except BaseException:
            group.barrier.abort()
            raise

    with ThreadPoolExecutor(WORLD) as ex:
        futures = [ex.submit(run, r) for r in range(WORLD)]
        return [f.result(timeout=60) for f in futures]


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def dense_site(cav_eta, cav_prec, theta, module, b) -> tuple[dict, dict]:
    """By hand: C = N_k / n_b · exact Fisher of the batch at θ; λ = C, η = (Λ_cav + C) θ − η_cav."""
    curv = {n: f * (N_K / BS) for n, f in diag_fisher(module, [b], fisher="exact").items()}
    return ({n: (cav_prec[n] + curv[n]) * theta[n] - cav_eta[n] for n in theta}, curv)


def grads_after_cavity_term(s: PosteriorServerStrategy, module: nn.Module) -> dict[str, torch.Tensor]:
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    s.add_cavity_grad(module)
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def close(a: dict, b: dict, **tol) -> None:
    for n, want in b.items():
        torch.testing.assert_close(a[n], want, **tol)


def test_two_workers_damped_sites_match_the_dense_parallel_ep_step():
    """Sites after two syncs = δ-interpolations (δ = 1/2) of Laplace sites against the true cavities."""
    ws, group = workers(recenter=False)
    assert all(s.stats()["damping"] == 0.5 for s, _ in ws)
    own, cav_eta, cav_prec = {}, {}, {}
    zero = {n: torch.zeros_like(t) for n, t in params(ws[0][1]).items()}
    for step in range(2):
        thetas = [params(m) for _, m in ws]
        for r, (s, m) in enumerate(ws):
            s.observe(batch(r, step))
        on_both(ws, lambda s, m, r: s.sync(), group)
        for r, (s, m) in enumerate(ws):
            o = 1 - r  # the cavity of worker r: base prior (mean 0) + the other worker's site before this sync
            o_eta, o_prec = own.get(o, (zero, zero))
            cav_eta[r] = dict(o_eta)
            cav_prec[r] = {n: P0 + v for n, v in o_prec.items()}
        new_own = {}
        for r, (s, m) in enumerate(ws):
            with torch.no_grad():
                for n, p in m.named_parameters():  # the Fisher at the weights the sync saw
                    p.copy_(thetas[r][n])
            eta_new, prec_new = dense_site(cav_eta[r], cav_prec[r], thetas[r], m, batch(r, step))
            old_eta, old_prec = own.get(r, (zero, zero))
            new_own[r] = ({n: 0.5 * old_eta[n] + 0.5 * eta_new[n] for n in zero},
                          {n: 0.5 * old_prec[n] + 0.5 * prec_new[n] for n in zero})
            close(s.local_site.eta, new_own[r][0], rtol=1e-9, atol=1e-10)
            close(s.local_site.precision, new_own[r][1], rtol=1e-9, atol=1e-10)
        own = new_own
        for s, _ in ws:  # every rank: prior + both sites (the other one learnt through the all-reduce)
            q = s.posterior()
            close(q.precision, {n: P0 + own[0][1][n] + own[1][1][n] for n in zero}, rtol=1e-9, atol=1e-10)
            close(q.eta, {n: own[0][0][n] + own[1][0][n] for n in zero}, rtol=1e-9, atol=1e-10)
    assert group.calls == 2 and ws[0][0].num_syncs == 2


def test_the_cavity_term_switches_on_after_the_first_sync_with_two_workers():
    """Before any exchange the cavity is the base prior (no term, like the callbacks); after it, every worker adds
    (Λ_{-k} θ − η_{-k}) / N_k with Λ_{-k} = prior + the other worker's site."""
    ws, group = workers(recenter=False)
    for s, m in ws:
        assert all(float(g.abs().max()) == 0.0 for g in grads_after_cavity_term(s, m).values())
        s.observe(batch(s.global_rank, 0))
    on_both(ws, lambda s, m, r: s.sync(), group)
    for r, (s, m) in enumerate(ws):
        other = ws[1 - r][0].local_site
        theta = params(m)
        want = {n: ((P0 + other.precision[n]) * theta[n] - other.eta[n]) / N_K for n in theta}
        got = grads_after_cavity_term(s, m)
        assert all(float(g.abs().max()) > 0 for g in got.values())
        close(got, want, rtol=1e-8, atol=1e-12)
        close(s.cavity().precision, {n: P0 + other.precision[n] for n in theta}, rtol=1e-9, atol=1e-12)


def test_the_cavity_precision_is_floored_at_the_task_prior():
    """The others' share is a difference of all-reduce sums: an entry whose exact value is 0 may come back as
    −(rounding). The cavity's precision never goes below the task's prior, and its η is kept."""
    ws, _ = workers()
    s, m = ws[0]
    server = s.server
    like = server.prior.eta
    prec = {n: torch.zeros_like(t) for n, t in like.items()}
    prec["net.0.weight"][0, 0] = -1e-3  # ten times the prior's 1e-4: the cavity would be negative there
    prec["net.2.bias"][1] = 2.0
    eta = {n: torch.full_like(t, 0.25) for n, t in like.items()}
    server.replace(s.others_key, DiagGaussian(eta, prec, signed=True))
    cav = s.cavity()
    want = {n: torch.clamp(P0 + p, min=P0) for n, p in prec.items()}
    close(cav.precision, want, rtol=0, atol=0)
    close(cav.eta, eta, rtol=0, atol=0)
    assert float(cav.precision["net.0.weight"][0, 0]) == P0 and float(cav.precision["net.2.bias"][1]) == P0 + 2.0
    s.penalise_prior_alone = True  # no sync yet: the term is off otherwise; the gradient uses the floored cavity
    theta = params(m)
    got = grads_after_cavity_term(s, m)
    close(got, {n: (want[n] * theta[n] - eta[n]) / N_K for n in theta}, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gather", [True, False])
def test_end_task_leaves_identical_servers_keyed_by_task_and_worker(gather):
    ws, group = workers(gather_sites=gather)
    for s, _ in ws:
        s.observe(batch(s.global_rank, 0))
    on_both(ws, lambda s, m, r: s.sync(), group)
    sites = [s.local_site for s, _ in ws]
    qs = on_both(ws, lambda s, m, r: s.end_task(), group)
    (s0, m0), (s1, m1) = ws
    want = [SiteKey(0, 0), SiteKey(0, 1)] if gather else [SiteKey(0)]
    assert list(s0.server.names) == list(s1.server.names) == want and s0.tasks_seen == s1.tasks_seen == 1
    for key in want:
        for a, b in zip(s0.server[key].eta.values(), s1.server[key].eta.values()):
            assert torch.equal(a, b)
    for n in qs[0].names:  # bitwise identical on both ranks, = prior + both sites; weights on the mean
        assert torch.equal(qs[0].precision[n], qs[1].precision[n]) and torch.equal(qs[0].eta[n], qs[1].eta[n])
        torch.testing.assert_close(qs[0].precision[n], P0 + sites[0].precision[n] + sites[1].precision[n])
        assert torch.equal(dict(m0.named_parameters())[n], dict(m1.named_parameters())[n])
    assert s0.local_site is None and s0.last_gather_drift < 1e-9
