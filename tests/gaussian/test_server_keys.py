"""PosteriorServer's API for the distributed strategy: SiteKey names kept as data (also through a state dict), a
per-call damping, and the cavity's precision floor against a dense computation."""

from __future__ import annotations

import pytest
import torch

from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.server import PosteriorServer, SiteKey

DT = torch.float64
SHAPES = {"w": (2, 3), "b": (3,)}


def gauss(seed: int, signed: bool = False) -> DiagGaussian:
    g = torch.Generator().manual_seed(seed)
    eta = {n: torch.randn(s, generator=g, dtype=DT) for n, s in SHAPES.items()}
    prec = {n: torch.rand(s, generator=g, dtype=DT) - (0.5 if signed else 0.0) for n, s in SHAPES.items()}
    return DiagGaussian(eta, prec, signed=signed)


def test_site_key_prints_validates_and_survives_a_state_dict(prior):
    assert [str(k) for k in (SiteKey(3), SiteKey(3, 1), SiteKey(3, 1, others=True))] == \
        ["task-3", "task-3/worker-1", "task-3/others-of-1"]
    for bad in ({"task": -1}, {"task": 1.0}, {"task": 0, "worker": -2}, {"task": 0, "others": True}):
        with pytest.raises(ValueError, match="task|worker|others"):
            SiteKey(**bad)
    server = PosteriorServer(prior(SHAPES, 0.5))
    for key in (SiteKey(0, 0), SiteKey(0, 1), "callback-site", SiteKey(2)):
        server.add(key, gauss(len(server)))
    assert server.tasks() == (0, 2)
    with pytest.raises(KeyError, match="prints as 'task-2'"):
        server.add("task-2", gauss(9))  # would collide with SiteKey(2) in the state dict
    sd = server.state_dict()
    assert list(sd["sites"]) == ["task-0/worker-0", "task-0/worker-1", "callback-site", "task-2"]
    back = PosteriorServer.from_state_dict(sd)
    assert back.names == (SiteKey(0, 0), SiteKey(0, 1), "callback-site", SiteKey(2))
    assert "keys" not in PosteriorServer(prior(SHAPES, 0.5)).state_dict()  # string-named servers keep their old state dict


def test_update_takes_a_damping_per_call(prior):
    server = PosteriorServer(prior(SHAPES, 0.5), damping=1.0)
    old, new = gauss(1), gauss(2)
    server.add(SiteKey(0, 0), old)
    got = server.update(SiteKey(0, 0), new, damping=0.25)
    for n in SHAPES:
        torch.testing.assert_close(got.eta[n], 0.75 * old.eta[n] + 0.25 * new.eta[n])
        torch.testing.assert_close(server[SiteKey(0, 0)].precision[n], 0.75 * old.precision[n] + 0.25 * new.precision[n])
    assert server.damping == 1.0
    with pytest.raises(ValueError, match="damping"):
        server.update(SiteKey(0, 0), new, damping=0.0)


def test_cavity_floor_is_the_prior_of_the_task(prior):
    """floor=True: max(p0 · Π_{k≠own} t_k, p0 · Π_{k of other tasks} t_k) in precision, η unchanged."""
    server = PosteriorServer(prior(SHAPES, 0.5))
    past, own, others = gauss(1), gauss(2), gauss(3, signed=True)
    server.add(SiteKey(0), past)
    server.add("callback-site", gauss(4))
    server.add(SiteKey(1, 0), own)
    server.add(SiteKey(1, 0, others=True), others)
    cb = server["callback-site"]
    p0 = prior(SHAPES, 0.5)
    dense_prec = {n: p0.precision[n] + past.precision[n] + cb.precision[n] + others.precision[n] for n in SHAPES}
    floor = {n: p0.precision[n] + past.precision[n] + cb.precision[n] for n in SHAPES}
    raw, cav = server.cavity(SiteKey(1, 0)), server.cavity(SiteKey(1, 0), floor=True)
    assert any(bool((dense_prec[n] < floor[n]).any()) for n in SHAPES)  # the floor acts somewhere
    for n in SHAPES:
        torch.testing.assert_close(raw.precision[n], dense_prec[n])
        torch.testing.assert_close(cav.precision[n], torch.maximum(dense_prec[n], floor[n]))
        torch.testing.assert_close(cav.eta[n], raw.eta[n])
    same = server.cavity("callback-site", floor=True)  # a string name: no task, no clamp
    for n in SHAPES:
        torch.testing.assert_close(same.precision[n], server.cavity("callback-site").precision[n])
