"""Curvature against dense references: a per-example autograd loop for the diagonal, the exact Fisher of a single
linear layer and KFAC's own definition for the Kronecker factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayescl._params import linear_layers
from bayescl.curvature import diag_fisher, kfac
from bayescl.harness.models import MLP, MultiHeadMLP

DT = torch.float64


def _data(n=10, d=5, c=3, tasks=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    if tasks is None:
        return TensorDataset(x, y)
    return TensorDataset(x, y, torch.randint(0, tasks, (n,), generator=g))


def _mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return MLP(in_features=5, hidden=(4,), num_classes=3, **kw).to(DT)


def _example_grads(model, logits_fn, params):
    """Gradient of a scalar of one example's logits, as a dict over ``params``."""
    gs = torch.autograd.grad(logits_fn(), list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), gs)}


def _reference(model, dataset, fisher, loss="ce", batch_size=4):
    """Per-example Python loop with torch.autograd (the dense reference)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    if fisher == "batch_squared":
        for batch in DataLoader(dataset, batch_size=batch_size):
            x, y, *t = batch
            lossv = nn.functional.cross_entropy(model(x, *t), y)
            gs = torch.autograd.grad(lossv, list(params.values()), allow_unused=True)
            for n, g in zip(params, gs):
                if g is not None:
                    out[n] += len(y) * g**2
        return out
    for i in range(len(dataset)):
        x, y, *t = (v.unsqueeze(0) for v in dataset[i])

        def logits(x=x, t=t):
            return model(x, *t)[0]

        if loss == "mse":
            for c in range(3):  # loss sum_c (f_c - y_c)^2, Hessian 2I: sqrt(2) e_c columns
                g = _example_grads(model, lambda c=c: 2**0.5 * logits()[c], params)
                for n in out:
                    out[n] += g[n] ** 2
            continue
        p = logits().detach().softmax(-1)
        labels = range(len(p)) if fisher == "exact" else [int(y)]
        for c in labels:
            g = _example_grads(model, lambda c=c: -logits().log_softmax(-1)[c], params)
            w = p[c] if fisher == "exact" else 1.0
            for n in out:
                out[n] += w * g[n] ** 2
    return out


def _close(a, b, **kw):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=lambda m, n=n: f"{n}: {m}", **kw)


@pytest.mark.parametrize("fisher", ["exact", "empirical", "batch_squared"])
def test_diag_fisher_matches_per_example_loop(fisher):
    model, ds = _mlp(), _data()
    got = diag_fisher(model, DataLoader(ds, batch_size=4), fisher=fisher)
    _close(got, _reference(model, ds, fisher))
    assert all(v.dtype == DT for v in got.values())


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_diag_fisher_multihead_batches_and_unused_heads(fisher):
    torch.manual_seed(1)
    model = MultiHeadMLP(in_features=5, hidden=(4,), num_tasks=3, classes_per_task=3).to(DT)
    ds = _data(n=9, tasks=2)  # tasks 0 and 1 only: head 2 is never used
    got = diag_fisher(model, DataLoader(ds, batch_size=4), fisher=fisher)
    _close(got, _reference(model, ds, fisher))
    assert got["heads.2.weight"].abs().sum() == 0 and got["heads.0.weight"].abs().sum() > 0


def test_mc_reproduces_its_sampled_labels_and_converges_to_exact():
    model, ds = _mlp(), _data(n=6)
    loader = DataLoader(ds, batch_size=6)
    got = diag_fisher(model, loader, fisher="mc", mc_samples=3, generator=torch.Generator().manual_seed(5))
    x = ds.tensors[0]
    p = model(x).softmax(-1)
    labels = torch.multinomial(p, 3, replacement=True, generator=torch.Generator().manual_seed(5))
    ref = {n: torch.zeros_like(v) for n, v in got.items()}
    for s in range(3):
        r = _reference(model, TensorDataset(x, labels[:, s]), "empirical")
        for n in ref:
            ref[n] += r[n] / 3
    _close(got, ref)
    many = diag_fisher(model, loader, fisher="mc", mc_samples=4000, generator=torch.Generator().manual_seed(0))
    exact = diag_fisher(model, loader, fisher="exact")
    for n in exact:
        err = (many[n] - exact[n]).norm() / exact[n].norm()
        assert err < 0.08, (n, float(err))


def test_mse_and_callable_losses():
    model, ds = _mlp(), _data()
    x, y = ds.tensors
    ds_mse = TensorDataset(x, torch.randn(len(y), 3, dtype=DT))
    _close(diag_fisher(model, DataLoader(ds_mse, batch_size=4), fisher="exact", loss="mse"),
           _reference(model, ds_mse, "exact", loss="mse"))
    loader = DataLoader(ds, batch_size=4)
    emp = diag_fisher(model, loader, fisher="empirical")
    for fn in (lambda f, t: nn.functional.cross_entropy(f, t, reduction="none"), nn.functional.cross_entropy):
        _close(diag_fisher(model, loader, fisher="empirical", loss=fn), emp)
    with pytest.raises(ValueError, match="callable loss"):
        diag_fisher(model, loader, fisher="exact", loss=nn.functional.cross_entropy)


class _ConvNet(nn.Module):
    """Conv + BatchNorm + in-place ReLU + Linear head; BatchNorm (and a 'same'-padded conv) go through torch.func."""

    def __init__(self, **conv):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, **conv)
        self.bn = nn.BatchNorm2d(2)
        self.act = nn.ReLU(inplace=True)
        side = self.conv(torch.zeros(1, 1, 5, 5)).shape[-1]
        self.head = nn.Linear(2 * side * side, 3)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x.view(-1, 1, 5, 5)))).flatten(1))


@pytest.mark.parametrize("conv", [{"stride": 2, "padding": 1, "dilation": 1}, {"dilation": 2}, {"padding": "same"}])
def test_conv_layers_match_per_example_loop(conv):
    torch.manual_seed(0)
    model = _ConvNet(**conv).to(DT)
    ds = TensorDataset(torch.randn(7, 25, dtype=DT), torch.randint(0, 3, (7,)))
    _close(diag_fisher(model, DataLoader(ds, batch_size=3), fisher="exact"), _reference(model, ds, "exact"))


def test_vmap_path_batchnorm_eval_mode_and_state_restored():
    torch.manual_seed(0)
    model = _ConvNet().to(DT)
    model.bn.running_mean.normal_()
    model.train()
    model.bn.eval()  # a mixed mode that must come back as it was
    ds = TensorDataset(torch.randn(7, 25, dtype=DT), torch.randint(0, 3, (7,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = diag_fisher(model, DataLoader(ds, batch_size=3), fisher="exact")
    assert model.training and not model.bn.training and model.conv.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    ref = _reference(model, ds, "exact")
    _close(got, ref)


def test_frozen_params_filter_and_errors():
    model, ds = _mlp(), _data()
    loader = DataLoader(ds, batch_size=4)
    model.trunk[1].weight.requires_grad_(False)
    got = diag_fisher(model, loader, fisher="empirical")
    assert "trunk.1.weight" not in got and set(got) == {"trunk.1.bias", "head.weight", "head.bias"}
    assert set(diag_fisher(model, loader, params=["head.bias", "trunk.1.weight"])) == {"head.bias"}
    with pytest.raises(ValueError, match="not parameters"):
        diag_fisher(model, loader, params=["nope"])
    with pytest.raises(ValueError, match="no batches"):
        diag_fisher(model, DataLoader(TensorDataset(torch.zeros(0, 5, dtype=DT), torch.zeros(0).long())))
    with pytest.raises(ValueError, match="fisher="):
        diag_fisher(model, loader, fisher="hessian")
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(ValueError, match="parameter .* is not finite"):
        diag_fisher(model, loader, fisher="exact")


def _dense_fisher_linear(layer, x, hess):
    """Exact Fisher sum_n J_n^T H_n J_n of a single linear layer, in row-major vec of [W, b]."""
    wb = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()

    def f(flat, xn):
        m = flat.view_as(wb)
        return m[:, :-1] @ xn + m[:, -1]

    out = 0
    for n, xn in enumerate(x):
        J = torch.func.jacrev(f)(wb.reshape(-1), xn)
        out = out + J.T @ hess(f(wb.reshape(-1), xn)) @ J
    return out


def test_kfac_is_exact_for_a_linear_layer_with_gaussian_likelihood():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(DT)
    x, t = torch.randn(7, 4, dtype=DT), torch.randn(7, 3, dtype=DT)
    (A, G), = kfac(layer, DataLoader(TensorDataset(x, t), batch_size=3), fisher="exact", loss="mse").values()
    dense = _dense_fisher_linear(layer, x, lambda f: 2 * torch.eye(3, dtype=DT))
    torch.testing.assert_close(torch.kron(G, A), dense)


def test_kfac_single_example_cross_entropy_matches_dense_fisher_and_diag():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(1, 4, dtype=DT), torch.tensor([2])
    loader = DataLoader(TensorDataset(x, y))
    (A, G), = kfac(layer, loader, fisher="exact").values()

    def hess(f):
        p = f.softmax(-1)
        return torch.diag(p) - torch.outer(p, p)

    dense = _dense_fisher_linear(layer, x, hess)
    torch.testing.assert_close(torch.kron(G, A), dense)
    d = diag_fisher(layer, loader, fisher="exact")
    diag_wb = torch.cat([d["weight"], d["bias"][:, None]], 1).reshape(-1)
    torch.testing.assert_close(torch.kron(G, A).diagonal(), diag_wb)


def test_kfac_factors_follow_their_definition_on_a_two_layer_mlp():
    """A = sum_n a a^T / N (with a 1 appended), G = sum_n g g^T at the true labels (empirical)."""
    model, ds = _mlp(), _data(n=9)
    got = kfac(model, DataLoader(ds, batch_size=4), fisher="empirical")
    x, y = ds.tensors
    h = model.trunk[1](x)
    z = model.head(torch.relu(h))
    loss = nn.functional.cross_entropy(z, y, reduction="sum")
    gh, gz = torch.autograd.grad(loss, [h, z])
    ones = torch.ones(9, 1, dtype=DT)
    for name, a, g in (("trunk.1", x, gh), ("head", torch.relu(h), gz)):
        a1 = torch.cat([a, ones], 1).detach()
        torch.testing.assert_close(got[name][0], a1.T @ a1 / 9)
        torch.testing.assert_close(got[name][1], g.T @ g)


def test_kfac_multihead_unused_heads_and_errors():
    torch.manual_seed(0)
    model = MultiHeadMLP(in_features=5, hidden=(4,), num_tasks=3, classes_per_task=3).to(DT)
    x, y = _data(n=6).tensors
    for task_ids in (torch.zeros(6, dtype=torch.long), torch.tensor([0, 1, 0, 1, 0, 1])):
        got = kfac(model, DataLoader(TensorDataset(x, y, task_ids), batch_size=3), fisher="mc")
        assert got["heads.2"][1].abs().sum() == 0 and got["heads.0"][1].abs().sum() > 0
        assert got["heads.2"][0].shape == (5, 5)
    assert linear_layers(model, layers=["trunk.1"]) == {"trunk.1": ("trunk.1.weight", "trunk.1.bias")}
    with pytest.raises(ValueError, match="module types found: .*LayerNorm"):
        kfac(nn.Sequential(nn.LayerNorm(5)), DataLoader(TensorDataset(x, y)))
    with pytest.raises(ValueError, match="no batches"):
        kfac(model, [])
    with pytest.raises(ValueError, match="batch_squared"):
        kfac(model, DataLoader(TensorDataset(x, y)), fisher="batch_squared")


def _eta(g):
    return g.eta() if callable(g.eta) else g.eta  # property on DiagGaussian, method on KronGaussian (for now)


def test_sites_have_the_summed_curvature_as_precision_and_the_weights_as_mean():
    from bayescl.curvature import diag_site, kron_site

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT)
    loader = DataLoader(_data(), batch_size=4)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    site = diag_site(model, loader, fisher="exact")
    F = diag_fisher(model, loader, fisher="exact")
    _close(site.precision, F)
    _close(_eta(site), {n: F[n] * theta[n] for n in F})
    ks = kron_site(model, loader, fisher="exact")
    factors = kfac(model, loader, fisher="exact")
    assert set(ks.layers) == {"0", "2"} and ks.num_terms == {"0": 1, "2": 1}
    _close(ks.diag, {n: F[n] if n.startswith("1.") else torch.zeros((), dtype=DT) for n in F})
    A, G = factors["2"]
    wb = torch.cat([theta["2.weight"], theta["2.bias"][:, None]], 1)
    eta = _eta(ks)
    torch.testing.assert_close(torch.cat([eta["2.weight"], eta["2.bias"][:, None]], 1), G @ wb @ A)
    zero = {n: torch.zeros_like(t) for n, t in ks.quadratic_grad(theta).items()}
    _close(ks.quadratic_grad(theta), zero)  # the site's gradient vanishes at its own mean


def test_inplace_activation_after_a_linear_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).to(DT)
    ds = _data()
    _close(diag_fisher(model, DataLoader(ds, batch_size=4), fisher="exact"), _reference(model, ds, "exact"))


def test_kron_site_over_selected_parameters_equals_the_full_site_restricted():
    """``params`` computes the site for the selected parameters only; it equals the full site cut back to them
    (the curvature of one layer does not depend on which others are included). A weight selected without its
    bias is a Kronecker block of the weight alone: ``A`` has no bias row."""
    from bayescl.curvature import kron_site

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT)
    loader = DataLoader(_data(), batch_size=4)
    names = ["1.weight", "2.weight", "2.bias"]
    full = kron_site(model, loader, fisher="exact").restrict(names)
    part = kron_site(model, loader, fisher="exact", params=names)
    assert part.names == full.names and part.layers == full.layers == {"2": ("2.weight", "2.bias")}
    _close(_eta(part), _eta(full))
    _close(part.diag, full.diag)
    (A, G), = kfac(model, loader, fisher="exact", params=["0.weight"]).values()
    (A_b, G_b), = kfac(model, loader, fisher="exact", layers=["0"]).values()
    torch.testing.assert_close(A, A_b[:5, :5])
    torch.testing.assert_close(G, G_b)
    with pytest.raises(ValueError, match="nope"):
        kron_site(model, loader, params=["nope"])


@pytest.mark.parametrize("T", [0.5, 3.0])
def test_tempered_curvature_is_the_fisher_of_softmax_f_over_T(T):
    """Dense reference: the tempered Fisher is the exact (diag) Fisher of the model whose logits are f/T, i.e.
    J^T (diag p_T - p_T p_T^T) J / T^2; KFAC of one example equals that block densely; mse refuses a temperature."""
    model, ds = _mlp(), _data()
    loader = DataLoader(ds, batch_size=4)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(x) / T

    ref = _reference(Scaled(), ds, "exact")
    got = diag_fisher(model, loader, fisher="exact", temperature=T)
    _close(got, {n.removeprefix("m."): v for n, v in ref.items()})
    plain = diag_fisher(model, loader, fisher="exact")
    assert not torch.allclose(got["head.weight"], plain["head.weight"])
    emp = diag_fisher(model, loader, fisher="empirical", temperature=T)
    _close(emp, {n.removeprefix("m."): v for n, v in _reference(Scaled(), ds, "empirical").items()})

    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(DT)
    x, y = torch.randn(1, 4, dtype=DT), torch.tensor([2])
    (A, G), = kfac(layer, DataLoader(TensorDataset(x, y)), fisher="exact", temperature=T).values()

    def hess(f):
        p = (f / T).softmax(-1)
        return (torch.diag(p) - torch.outer(p, p)) / T**2

    torch.testing.assert_close(torch.kron(G, A), _dense_fisher_linear(layer, x, hess))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            diag_fisher(model, loader, temperature=bad)
    with pytest.raises(ValueError, match="temperature=2.0 applies to loss='ce' only"):
        kfac(layer, DataLoader(TensorDataset(x, torch.randn(1, 3, dtype=DT))), loss="mse", temperature=2.0)
