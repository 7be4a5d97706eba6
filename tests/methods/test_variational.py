import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from bayescl.gaussian.diag import DiagGaussian, diag_gaussian_kl
from bayescl.harness.models import MultiHeadMLP, SmallCNN
from bayescl.methods.variational import (
    BayesConv2d,
    BayesLinear,
    convert,
    layer_posterior,
    load_posterior,
    logical_names,
    set_stochastic,
    tiled,
    variational_layers,
)
from bayescl.methods.variational_init import DEFAULT_FAN_IN_RATIO, LogvarInit, resolve_logvar_init
from bayescl.methods.variational_predictive import enable_predictive, predictive_samples, raw_samples


def _random_linear(seed=0, n_in=4, n_out=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    layer = BayesLinear(n_in, n_out).to(dtype)
    with torch.no_grad():
        layer.weight_mu.copy_(torch.randn(n_out, n_in, generator=g, dtype=dtype))
        layer.weight_logvar.copy_(torch.randn(n_out, n_in, generator=g, dtype=dtype) - 1.0)
        layer.bias_mu.copy_(torch.randn(n_out, generator=g, dtype=dtype))
        layer.bias_logvar.copy_(torch.randn(n_out, generator=g, dtype=dtype) - 1.0)
    return layer


def _random_prior(names_shapes, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mean = {n: torch.randn(s, generator=g, dtype=dtype) for n, s in names_shapes.items()}
    prec = {n: torch.rand(s, generator=g, dtype=dtype) * 3 + 0.2 for n, s in names_shapes.items()}
    return DiagGaussian.from_mean_precision(mean, prec)


def test_kl_matches_diag_gaussian_and_monte_carlo():
    layer = _random_linear()
    m = nn.Sequential(layer)
    q = layer_posterior(m)
    prior = _random_prior({n: q.mean[n].shape for n in q.names})
    kl_layer = layer.kl({"weight": prior.mean["0.weight"], "bias": prior.mean["0.bias"]},
                        {"weight": prior.precision["0.weight"], "bias": prior.precision["0.bias"]})
    assert torch.allclose(kl_layer, q.kl(prior), rtol=1e-12)
    # against torch.distributions
    ref = sum(torch.distributions.kl_divergence(Normal(q.mean[n], q.variance[n].sqrt()),
                                                Normal(prior.mean[n], prior.variance[n].sqrt())).sum()
              for n in q.names)
    assert torch.allclose(kl_layer, ref, rtol=1e-10)
    # Monte Carlo: E_q[log q - log p]
    torch.manual_seed(0)
    s = q.sample(200_000)
    lq = sum(Normal(q.mean[n], q.variance[n].sqrt()).log_prob(s[n]).flatten(1).sum(1) for n in q.names)
    lp = sum(Normal(prior.mean[n], prior.variance[n].sqrt()).log_prob(s[n]).flatten(1).sum(1) for n in q.names)
    diff = lq - lp
    se = diff.std() / math.sqrt(diff.numel())
    assert abs(float(diff.mean() - kl_layer.detach())) < 5 * float(se)
    # gradient of the closed form: d/dmu = lambda_p (mu - mu_p), d/dlogvar = (lambda_p e^l - 1)/2
    mu, lv = layer.weight_mu, layer.weight_logvar
    pm, pp = prior.mean["0.weight"], prior.precision["0.weight"]
    gm, gl = torch.autograd.grad(diag_gaussian_kl(mu, lv, pm, pp), (mu, lv))
    assert torch.allclose(gm, pp * (mu - pm))
    assert torch.allclose(gl, 0.5 * (pp * lv.exp() - 1))


def test_local_reparameterisation_moments_linear():
    torch.manual_seed(0)
    layer = _random_linear(n_in=5, n_out=3)
    x = torch.randn(2, 5, dtype=torch.float64)
    n = 40_000
    with torch.no_grad():
        out = layer(x.repeat(n, 1)).view(n, 2, 3)
        # reference: sample whole weights
        w = layer.weight_mu + layer.weight_logvar.exp().sqrt() * torch.randn(n, 3, 5, dtype=torch.float64)
        b = layer.bias_mu + layer.bias_logvar.exp().sqrt() * torch.randn(n, 3, dtype=torch.float64)
        ref = torch.einsum("bi,noi->nbo", x, w) + b[:, None, :]
        mean = x @ layer.weight_mu.T + layer.bias_mu
        var = (x ** 2) @ layer.weight_logvar.exp().T + layer.bias_logvar.exp()
    for sample in (out, ref):
        assert torch.allclose(sample.mean(0), mean, atol=4 * float((var / n).sqrt().max()))
        assert torch.allclose(sample.var(0), var, rtol=0.05)


def test_local_reparameterisation_moments_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    layer = BayesConv2d(conv, logvar_init=-1.0)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    n = 20_000
    with torch.no_grad():
        out = layer(x.repeat(n, 1, 1, 1))
        mean = F.conv2d(x, layer.weight_mu, layer.bias_mu, stride=2, padding=1)
        var = F.conv2d(x ** 2, layer.weight_logvar.exp(), layer.bias_logvar.exp(), stride=2, padding=1)
        w = layer.weight_mu + layer.weight_logvar.exp().sqrt() * torch.randn(n, *layer.weight_mu.shape,
                                                                            dtype=torch.float64)
        patches = F.unfold(x, 3, padding=1, stride=2)[0]  # (C*k*k, L): a weight sample per whole output map
        ref = torch.einsum("nok,kl->nol", w.flatten(2), patches).view(n, 3, 3, 3)
        ref_var = ref.var(0) + layer.bias_logvar.exp()[:, None, None]
    assert torch.allclose(out.mean(0, keepdim=True), mean, atol=4 * float((var / n).sqrt().max()))
    assert torch.allclose(out.var(0, keepdim=True), var, rtol=0.06)
    assert torch.allclose(ref_var.unsqueeze(0), var, rtol=0.06)
    set_stochastic(layer, False)
    assert torch.equal(layer(x), conv(x))


def test_convert_idempotent_and_names():
    m = MultiHeadMLP(hidden=(6, 5), num_tasks=2)
    w = m.trunk[1].weight.detach().clone()
    convert(m)
    layers = variational_layers(m)
    assert list(layers) == ["trunk.1", "trunk.3", "heads.0", "heads.1"]
    assert torch.equal(m.trunk[1].weight_mu, w)
    assert bool((m.trunk[1].weight_logvar == -6.0).all())
    ids = [id(p) for p in m.parameters()]
    convert(m, logvar_init=-2.0)
    assert [id(p) for p in m.parameters()] == ids
    assert logical_names(m)["heads.1.bias"] == ("heads.1.bias_mu", "heads.1.bias_logvar")
    # only some layers
    m2 = convert(MultiHeadMLP(hidden=(6,), num_tasks=2), include=r"^heads\.")
    assert isinstance(m2.trunk[1], nn.Linear) and isinstance(m2.heads[0], BayesLinear)
    # conv
    c = convert(SmallCNN())
    assert isinstance(c.features[0], BayesConv2d) and isinstance(c.head, BayesLinear)
    assert c(torch.rand(2, 784)).shape == (2, 10)


def test_convert_errors():
    with pytest.raises(ValueError, match="ReLU"):
        convert(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(ValueError, match="logvar_init"):
        convert(nn.Sequential(nn.Linear(2, 2)), logvar_init=float("nan"))
    with pytest.raises(ValueError, match="logvar_init"):
        BayesLinear(2, 2, logvar_init=float("inf"))
    with pytest.raises(ValueError, match="padding_mode"):
        BayesConv2d(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))


def test_posterior_round_trip():
    m = convert(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1, bias=False))).double()
    q = layer_posterior(m)
    assert q.names == ("0.weight", "0.bias", "2.weight")
    assert torch.allclose(q.variance["0.weight"], torch.full((2, 3), math.exp(-6.0), dtype=torch.float64))
    target = _random_prior({n: q.mean[n].shape for n in q.names})
    load_posterior(m, target)
    back = layer_posterior(m)
    for n in q.names:
        assert torch.allclose(back.mean[n], target.mean[n])
        assert torch.allclose(back.precision[n], target.precision[n])
    with pytest.raises(KeyError, match="nope"):
        layer_posterior(m, ["nope"])


def test_predictive_averages_probabilities():
    torch.manual_seed(0)
    m = convert(nn.Sequential(nn.Linear(4, 3))).double()
    with torch.no_grad():
        m[0].weight_logvar.fill_(0.0)
    enable_predictive(m, 7)
    enable_predictive(m, 7)  # idempotent: one hook
    assert len(m._forward_hooks) == 1
    x = torch.randn(5, 4, dtype=torch.float64)
    m.eval()
    torch.manual_seed(1)
    out = m(x)
    torch.manual_seed(1)
    with raw_samples(m):
        logits = [m(x) for _ in range(7)]
    probs = torch.stack([torch.softmax(z, -1) for z in logits]).mean(0)
    assert torch.allclose(out, probs.log())
    assert torch.allclose(out.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    assert not torch.allclose(logits[0].exp().sum(-1), torch.ones(5, dtype=torch.float64))  # raw: plain logits
    with predictive_samples(m, 1):  # one sample is log-probabilities too, not logits
        torch.manual_seed(1)
        assert torch.allclose(m(x), torch.log_softmax(logits[0], -1))
    m.train()
    assert not torch.allclose(m(x).exp().sum(-1), torch.ones(5, dtype=torch.float64))  # plain logits
    set_stochastic(m, False)
    m.eval()
    assert torch.allclose(m(x), torch.log_softmax(F.linear(x, m[0].weight_mu, m[0].bias_mu), -1))
    with pytest.raises(ValueError, match="test_samples"):
        predictive_samples(m, 0)


def test_predictive_log_loss_stays_finite_where_a_sample_underflows():
    """The average runs in log space: a class whose softmax underflows to 0 in every sample (logit gap ~ 1e3) still
    gets a finite log-probability, the log-sum-exp of the samples' log-probabilities."""
    torch.manual_seed(0)
    m = convert(nn.Sequential(nn.Linear(2, 2)))
    with torch.no_grad():
        m[0].weight_mu.copy_(torch.tensor([[1000.0, 0.0], [0.0, 0.0]]))
        m[0].bias_mu.zero_()
        m[0].weight_logvar.fill_(-2.0)
    enable_predictive(m, 5).eval()
    x = torch.tensor([[1.0, 0.0]])
    torch.manual_seed(3)
    out = m(x)
    torch.manual_seed(3)
    with raw_samples(m):
        ref = torch.logsumexp(torch.stack([torch.log_softmax(m(x).double(), -1) for _ in range(5)]), 0) - math.log(5)
    assert torch.isfinite(out).all() and out[0, 1] < -500
    assert torch.allclose(out.double(), ref, rtol=1e-5)
    assert torch.isfinite(F.cross_entropy(out, torch.tensor([1])))


def test_tiled_samples_equal_separate_passes_with_the_same_noise():
    """k samples as one pass over the repeated batch == k separate passes (dense float64 reference, same noise),
    in the outputs and in the gradient of the averaged loss; the first layer computes its moments once."""
    k, b = 3, 4
    net = nn.Sequential(_random_linear(0, 5, 4), nn.Tanh(), _random_linear(1, 4, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (b,), generator=g)
    l1, l2 = net[0], net[2]
    for layer in (l1, l2):
        layer.generator = torch.Generator().manual_seed(7)
    with tiled(net, (x, y), k) as (xt, yt):
        assert xt.shape == (k * b, 5) and torch.equal(yt, y.repeat(k))
        assert l1._untile(xt)[1] == k and torch.equal(l1._untile(xt)[0], x)
        out = net(xt)
        loss = F.cross_entropy(out, yt)
    assert l1.tiles == l2.tiles == 1
    params = [p for layer in (l1, l2) for _, mu, lv in layer.variational_params() for p in (mu, lv)]
    grads = torch.autograd.grad(loss, params)

    # reference: the same noise streams, drawn in the same order, sample by sample
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    eps1 = torch.randn(k, b, 4, generator=g1, dtype=torch.float64)
    eps2 = torch.randn(k * b, 3, generator=g2, dtype=torch.float64)

    def layer_out(layer, h, eps):
        mean = F.linear(h, layer.weight_mu, layer.bias_mu)
        var = F.linear(h * h, layer.weight_logvar.exp(), layer.bias_logvar.exp())
        return mean + var.sqrt() * eps

    outs = [layer_out(l2, torch.tanh(layer_out(l1, x, eps1[s])), eps2[s * b:(s + 1) * b]) for s in range(k)]
    ref_loss = sum(F.cross_entropy(o, y) for o in outs) / k
    ref_grads = torch.autograd.grad(ref_loss, params)
    assert torch.allclose(out, torch.cat(outs))
    for gr, rg in zip(grads, ref_grads):
        assert torch.allclose(gr, rg)


def test_tiled_falls_back_when_the_copies_differ():
    torch.manual_seed(0)
    layer = _random_linear(0, 5, 4)
    x = torch.randn(4, 5, dtype=torch.float64)
    with tiled(layer, x, 2) as xt:
        noisy = xt + 1e-3 * torch.randn_like(xt)  # e.g. dropout before the layer
        assert layer._untile(noisy)[1] == 1
        assert layer(noisy).shape == (8, 4)
        set_stochastic(layer, False)  # the means only: nothing to share
        assert torch.allclose(layer(xt), F.linear(xt, layer.weight_mu, layer.bias_mu))


def test_fan_in_init_variance_per_layer_is_the_formula():
    """``"fan_in:r"``: every weight and bias of a layer starts at ``log(r / (3 fan_in))`` (conv: in/groups·kh·kw)."""
    m = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 5, (1, 2)), nn.Flatten(), nn.Linear(70, 3))
    convert(m, logvar_init="fan_in:0.25")
    for layer, fan in [(m[0], 2 * 3 * 3), (m[1], 6 * 1 * 2), (m[3], 70)]:
        expected = math.log(0.25 / (3 * fan))
        assert torch.allclose(layer.weight_logvar, torch.full_like(layer.weight_logvar, expected))
        assert torch.allclose(layer.bias_logvar, torch.full_like(layer.bias_logvar, expected))
    assert m[3].logvar_init == "fan_in:0.25" and "fan_in:0.25" in repr(m[3])
    # "fan_in" alone uses the documented default ratio; the SmallCNN's layers get three different values
    c = convert(SmallCNN(), logvar_init="fan_in")
    got = {p: float(layer.weight_logvar.detach()[0].flatten()[0]) for p, layer in variational_layers(c).items()}
    assert got == pytest.approx({p: math.log(DEFAULT_FAN_IN_RATIO / (3 * f))
                                 for p, f in [("features.0", 25), ("features.3", 400), ("head", 512)]})
    # a constant keeps the old behaviour
    lin = BayesLinear(5, 2, logvar_init=-3)
    assert bool((lin.weight_logvar == -3.0).all()) and bool((lin.bias_logvar == -3.0).all())


@pytest.mark.parametrize("make", [lambda: nn.Linear(1500, 400), lambda: nn.Conv2d(12, 300, 5)])
def test_fan_in_init_is_ratio_times_pytorchs_init_variance(make):
    """Dense reference: ratio 1 gives exactly the empirical variance of PyTorch's default weight and bias init."""
    torch.manual_seed(0)
    layer = make()
    bayes = convert(layer, logvar_init="fan_in:1")
    var_w, var_b = bayes.weight_logvar.detach().exp(), bayes.bias_logvar.detach().exp()
    assert torch.allclose(var_w, var_w.flatten()[0].expand_as(var_w))
    assert float(var_w.flatten()[0]) == pytest.approx(float(layer.weight.var()), rel=0.02)
    biases = torch.cat([make().bias.detach() for _ in range(20)])
    assert float(var_b[0]) == pytest.approx(float(biases.var()), rel=0.06)


@pytest.mark.parametrize("bad, error", [
    ("fan_out", ValueError), ("fan_in:0", ValueError), ("fan_in:-0.1", ValueError), ("fan_in:abc", ValueError),
    ("fan_in:nan", ValueError), ("fan_in:inf", ValueError), ("", ValueError), (True, TypeError), (None, TypeError),
    ([-6.0], TypeError), (float("-inf"), ValueError),
])
def test_bad_logvar_init_is_rejected_with_a_clear_error(bad, error):
    with pytest.raises(error, match="logvar_init.*allowed: a finite real number.*'fan_in:<ratio>'"):
        convert(nn.Sequential(nn.Linear(2, 2)), logvar_init=bad)
    with pytest.raises(error, match="logvar_init"):
        BayesConv2d(nn.Conv2d(1, 1, 3), logvar_init=bad)
    assert resolve_logvar_init(" FAN_IN:0.5 ") == LogvarInit("fan_in", 0.5)
