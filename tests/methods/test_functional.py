"""The function-space prior's maths against dense references on tiny float64 models."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from bayescl.gaussian.diag import DiagGaussian
from bayescl.gaussian.kron import KronGaussian
from bayescl.harness.models import MultiHeadMLP
from bayescl.methods.functional import (
    FunctionalSite,
    allocate,
    function_kernel,
    functional_prior,
    hessian_score,
    select_memorable,
    stack_sites,
)


def _flat(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def _dense_jacobian(model, inputs, output):
    """(M, C, P) Jacobian of the function in the flat order of model.named_parameters()."""
    params = _flat(model)
    vec = torch.cat([p.reshape(-1) for p in params.values()])

    def f(v):
        d, i = {}, 0
        for n, p in params.items():
            d[n] = v[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        z = functional_call(model, d, inputs)
        return torch.softmax(z, -1) if output == "softmax" else z

    return jacrev(f)(vec)


def _dense_cov(q, model):
    """Σ in the flat order of model.named_parameters() (diag: from the variances; kron: inverse of to_dense)."""
    params = _flat(model)
    if isinstance(q, DiagGaussian):
        return torch.diag(torch.cat([q.variance[n].reshape(-1) for n in params]))
    order, lam = q.to_dense()
    offs, off = {}, 0
    for n, p in params.items():
        offs[n] = off
        off += p.numel()
    perm = []  # flat index of every entry of to_dense's order
    for name in order:
        if name in q.layers:
            w, b = q.layers[name]
            out, inp = params[w].shape[0], params[w][0].numel()
            for i in range(out):
                perm += [offs[w] + i * inp + j for j in range(inp)] + ([offs[b] + i] if b is not None else [])
        else:
            perm += list(range(offs[name], offs[name] + params[name].numel()))
    perm = torch.tensor(perm)
    cov = torch.zeros(off, off, dtype=lam.dtype)
    cov[perm[:, None], perm[None, :]] = torch.linalg.inv(lam)
    return cov


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(n, dtype=torch.float64)


def _posteriors(model):
    params = _flat(model)
    g = torch.Generator().manual_seed(3)
    diag = DiagGaussian.from_moments(params, {n: torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.1
                                              for n, p in params.items()})
    layers = {"0": ("0.weight", "0.bias"), "2": ("2.weight", "2.bias")}
    one_term = KronGaussian(params, layers, {"0": [(_spd(5, 1), _spd(4, 2))], "2": [(_spd(5, 3), _spd(3, 4))]},
                            {n: 0.5 for n in params})
    # two terms and a non-isotropic diagonal: the dense Cholesky path
    two_terms = KronGaussian(params, layers, {"0": [(_spd(5, 5), _spd(4, 6)), (_spd(5, 7), _spd(4, 8), 2.0)]},
                             {"0.weight": torch.rand(4, 4, dtype=torch.float64) + 0.3, "0.bias": 0.7,
                              "2.weight": 0.2, "2.bias": 0.9})
    return {"diag": diag, "kron-eigen": one_term, "kron-dense": two_terms}


@pytest.mark.parametrize("output", ["softmax", "logits"])
@pytest.mark.parametrize("kind", ["diag", "kron-eigen", "kron-dense"])
def test_kernel_is_the_per_output_block_of_the_dense_J_sigma_Jt(tiny, output, kind):
    model = tiny(4)
    x = torch.randn(6, 4, dtype=torch.float64)
    q = _posteriors(model)[kind]
    J = _dense_jacobian(model, (x,), output)
    full = torch.einsum("mcp,pq,ndq->mcnd", J, _dense_cov(q, model), J)  # the full (M·C)² covariance
    mean, K = function_kernel(model, q, (x,), output)
    assert K.shape == (3, 6, 6)
    for c in range(3):
        torch.testing.assert_close(K[c], full[:, c, :, c], atol=1e-10, rtol=1e-8)
    expected = torch.softmax(model(x), -1) if output == "softmax" else model(x)
    torch.testing.assert_close(mean, expected.detach())


def test_kernel_multi_head_uses_each_points_own_head_and_a_subset_posterior():
    torch.manual_seed(0)
    model = MultiHeadMLP(in_features=3, hidden=(4,), num_tasks=2).double()
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    params = _flat(model)
    q = DiagGaussian.from_moments(params, {n: torch.full_like(p, 0.3) for n, p in params.items()})
    J = _dense_jacobian(model, (x, t), "softmax")
    full = torch.einsum("mcp,ndp->mcnd", J * 0.3, J)
    _, K = function_kernel(model, q, (x, t))
    for c in range(2):
        torch.testing.assert_close(K[c], full[:, c, :, c], atol=1e-12, rtol=1e-9)
    # a posterior over the trunk only: the heads are fixed, only the trunk's covariance counts
    trunk = {n: p for n, p in params.items() if n.startswith("trunk")}
    qt = DiagGaussian.from_moments(trunk, {n: torch.full_like(p, 0.3) for n, p in trunk.items()})
    mask = torch.cat([torch.full((p.numel(),), float(n.startswith("trunk")), dtype=torch.float64)
                      for n, p in params.items()])
    full_t = torch.einsum("mcp,ndp->mcnd", J * (0.3 * mask), J)
    _, Kt = function_kernel(model, qt, (x, t))
    torch.testing.assert_close(Kt[1], full_t[:, 1, :, 1], atol=1e-12, rtol=1e-9)


def _site(model, x, q, jitter=1e-3):
    mean, K = function_kernel(model, q, (x,))
    return FunctionalSite((x,), mean, K, jitter)


def _dense_term(model, sites, picks, scale_by_size=True):
    """½ Σ_sites (M/s) Σ_c r_cᵀ (K_SS + jitter · I)⁻¹ r_c, by explicit inverses."""
    total = 0.0
    for s, idx in zip(sites, picks):
        idx = torch.arange(s.size) if idx is None else idx
        f = torch.softmax(model(s.inputs[0][idx]), -1)
        r = f - s.mean[idx]
        for c in range(s.num_outputs):
            k = s.kernel[c][idx][:, idx]
            k = k + s.jitter * torch.eye(len(idx), dtype=k.dtype)
            w = s.size / len(idx) if scale_by_size else 1.0
            total = total + w * 0.5 * r[:, c] @ torch.linalg.inv(k) @ r[:, c]
    return total


def test_term_and_its_gradient_equal_the_dense_formula(tiny):
    model = tiny(5)
    q = DiagGaussian.from_moments(_flat(model), {n: torch.full_like(p, 0.5) for n, p in _flat(model).items()})
    sites = [_site(model, torch.randn(7, 4, dtype=torch.float64), q),
             _site(model, torch.randn(4, 4, dtype=torch.float64), q)]
    with torch.no_grad():  # move away from the stored function so that the term is not zero
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = list(model.parameters())
    # every point (points_per_step=None): the full term with the cached factor
    term = functional_prior(model, sites)
    ref = _dense_term(model, sites, [None, None])
    assert float(ref.detach()) > 1e-3
    torch.testing.assert_close(term, ref)
    for g, r in zip(torch.autograd.grad(term, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r)
    # subsampled: each site's marginal on the drawn points, scaled by M/s; the draws follow the generator
    term = functional_prior(model, sites, points_per_step=5, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    assert allocate(5, [7, 4]) == [2, 2]
    picks = [torch.rand((1, 7), generator=g).argsort(-1)[0, :2].sort().values,
             torch.rand((1, 4), generator=g).argsort(-1)[0, :2].sort().values]
    ref = _dense_term(model, sites, picks)
    torch.testing.assert_close(term, ref)
    for g, r in zip(torch.autograd.grad(term, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r)


def test_term_is_zero_with_zero_gradient_at_the_stored_function(tiny):
    model = tiny(3)
    q = DiagGaussian.from_moments(_flat(model), {n: torch.full_like(p, 0.5) for n, p in _flat(model).items()})
    site = _site(model, torch.randn(5, 4, dtype=torch.float64), q)
    term = functional_prior(model, [site])
    assert abs(float(term.detach())) < 1e-20
    assert all(float(g.abs().max()) < 1e-12 for g in torch.autograd.grad(term, list(model.parameters())))


def test_stacked_sites_of_equal_size_give_the_same_term_as_separate_ones(tiny):
    model = tiny(4)
    q = DiagGaussian.from_moments(_flat(model), {n: torch.full_like(p, 0.5) for n, p in _flat(model).items()})
    sites = [_site(model, torch.randn(6, 4, dtype=torch.float64), q) for _ in range(3)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    stacks = stack_sites(sites)
    assert len(stacks) == 1 and stacks[0].kernel.shape == (3, 3, 6, 6)
    torch.testing.assert_close(functional_prior(model, stacks), _dense_term(model, sites, [None] * 3))
    g = torch.Generator().manual_seed(1)
    idx = torch.rand((3, 6), generator=g).argsort(-1)[:, :2].sort(-1).values
    term = functional_prior(model, stacks, points_per_step=6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(term, _dense_term(model, sites, list(idx)))


def test_allocate_shares_the_cap_and_covers_every_task():
    assert allocate(None, [40, 40]) == [40, 40]
    assert allocate(64, [200] * 10) == [6] * 10
    assert allocate(64, [10, 200]) == [10, 32]
    assert allocate(3, [5] * 5) == [1] * 5  # at least one point per past task
    with pytest.raises(ValueError, match="points_per_step"):
        allocate(0, [3])


def test_hessian_score_is_the_trace_of_the_softmax_hessian_and_selection_takes_the_top_per_label():
    torch.manual_seed(0)
    logits = torch.randn(30, 4, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    dense = torch.stack([torch.trace(torch.diag(pi) - torch.outer(pi, pi)) for pi in p])
    torch.testing.assert_close(hessian_score(logits), dense)
    x, y = torch.randn(30, 2), torch.arange(30) % 3
    score = hessian_score(logits)
    idx = select_memorable(x, y, score, 7, "hessian")
    assert idx.tolist() == sorted(idx.tolist()) and len(set(idx.tolist())) == 7
    for lab, k in zip(range(3), (3, 2, 2)):  # 7 = 3 + 2 + 2 over the labels
        members = torch.nonzero(y == lab).flatten()
        best = members[score[members].argsort(descending=True)[:k]]
        assert sorted(best.tolist()) == sorted(i for i in idx.tolist() if y[i] == lab)
    # a label short of points: the rest come from the best of the others
    y2 = torch.tensor([0] * 28 + [1, 1])
    idx2 = select_memorable(x, y2, score, 6, "hessian")
    assert {28, 29} <= set(idx2.tolist()) and len(idx2) == 6
    g = torch.Generator().manual_seed(0)
    assert len(set(select_memorable(x, y, score, 5, "random", g).tolist())) == 5
    kc = select_memorable(x, y, score, 5, "kcenter")
    assert 0 in kc.tolist() and len(set(kc.tolist())) == 5  # greedy k-center starts at example 0


def test_bad_input_is_refused_with_the_argument_named():
    x, y, s = torch.randn(5, 2), torch.zeros(5, dtype=torch.long), torch.rand(5)
    with pytest.raises(ValueError, match="memory_size=5"):
        select_memorable(x, y, s, 5)
    with pytest.raises(ValueError, match="selection='best'"):
        select_memorable(x, y, s, 2, "best")
    with pytest.raises(ValueError, match="kernel of shape"):
        FunctionalSite((x,), torch.zeros(5, 2), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="jitter"):
        FunctionalSite((x,), torch.zeros(5, 2), torch.zeros(2, 5, 5), jitter=0.0)
    with pytest.raises(ValueError, match="at least one site"):
        functional_prior(nn.Linear(2, 2), [])
    model = nn.Linear(2, 2)
    q = DiagGaussian.isotropic({"other.weight": torch.zeros(2, 2)}, 1.0)
    with pytest.raises(ValueError, match="'other.weight' is not a parameter"):
        function_kernel(model, q, (x,))
    with pytest.raises(ValueError, match="output='probs'"):
        function_kernel(model, DiagGaussian.isotropic(_flat(model), 1.0), (x,), output="probs")


def test_site_state_round_trip_and_growing_head():
    torch.manual_seed(0)
    site = FunctionalSite((torch.randn(4, 3),), torch.softmax(torch.randn(4, 2), -1),
                          torch.stack([_spd(4, 1), _spd(4, 2)]).float(), 1e-3)
    back = FunctionalSite.from_state_dict(site.state_dict())
    torch.testing.assert_close(back.cholesky(), site.cholesky())
    # a head grown to 3 outputs: the site regularises the softmax over its own first 2 logits
    model = nn.Linear(3, 3)
    f2 = torch.softmax(model(site.inputs[0])[:, :2], -1)
    torch.testing.assert_close(functional_prior(model, [site]), site.quadratic(f2))
