r"""Mean-field Gaussian variational layers, the module swap that installs them, and their posterior.

A variational layer holds ``q(W) = Π_j N(W_j; μ_j, exp(ℓ_j))`` with parameters ``weight_mu``,
``weight_logvar``, ``bias_mu``, ``bias_logvar`` (``ℓ`` is the log-variance, initialised to ``logvar_init``: a
constant, ``−6`` as in VCL, or ``"fan_in"``, ``ℓ = log(r / (3 fan_in))``, ``r`` times the variance of PyTorch's
default weight init, see :mod:`bayescl.methods.variational_init`). Its forward pass uses the *local reparameterisation trick* (Kingma, Salimans & Welling 2015): instead of
sampling ``W`` it samples the pre-activations, which are Gaussian given the input,

.. math::  b = x W^\top + c,\quad \mathbb E[b] = x \mu_W^\top + \mu_c,\quad
           \mathrm{Var}[b] = x^{2} (\sigma^2_W)^\top + \sigma^2_c,

with fresh noise per example and per forward call (one Monte Carlo sample of the network per call, lower variance
than a shared weight sample). :class:`BayesConv2d` does the same with convolutions
(``Var = conv(x², σ²_W) + σ²_c``): the marginal of every output is exact, noise is independent across output
positions.

:func:`convert` swaps ``nn.Linear`` / ``nn.Conv2d`` layers for these in place (idempotent: variational layers are
left alone); the means start at the layer's current weights. The *logical* parameter of a layer at module path
``p`` is ``p.weight`` / ``p.bias`` (the name the plain layer had): :func:`layer_posterior` maps the layers to a
:class:`~bayescl.gaussian.diag.DiagGaussian` over logical names (mean ``μ``, variance ``exp(ℓ)``) and
:func:`load_posterior` maps one back.

A call in ``train()`` mode is one sample's logits; the Bayesian prediction (the MC-averaged eval-mode call) is in
:mod:`bayescl.methods.variational_predictive`. ``set_stochastic(module, False)`` makes every layer use its means
only (a deterministic network: maximum-likelihood pre-training).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayescl._checks import check_positive_int
from bayescl.gaussian.diag import DiagGaussian, diag_gaussian_kl
from bayescl.methods.variational_init import DEFAULT_LOGVAR_INIT, LogvarInit, resolve_logvar_init

#: Variances below this are clamped before the square root (keeps gradients finite at exactly zero input).
_MIN_VAR = 1e-30
#: A constant log-variance (float) or a rule (``"fan_in"``, ``"fan_in:<r>"``; :mod:`.variational_init`).
LogvarSpec = float | str | LogvarInit


class _BayesLayer(nn.Module):
    """Shared parameters and bookkeeping of :class:`BayesLinear` and :class:`BayesConv2d`."""

    weight_mu: nn.Parameter
    weight_logvar: nn.Parameter
    bias_mu: nn.Parameter | None
    bias_logvar: nn.Parameter | None

    def _init_params(self, weight: Tensor, bias: Tensor | None, logvar_init: LogvarSpec) -> None:
        rule = resolve_logvar_init(logvar_init)
        self.logvar_init = rule.spec()
        lv = rule.logvar(weight)  # one value for the weights and the bias (same init variance in PyTorch)
        self.weight_mu = nn.Parameter(weight.detach().clone())
        self.weight_logvar = nn.Parameter(torch.full_like(weight.detach(), lv))
        if bias is not None:
            self.bias_mu = nn.Parameter(bias.detach().clone())
            self.bias_logvar = nn.Parameter(torch.full_like(bias.detach(), lv))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_logvar", None)
        #: sample (True) or use the means only (False).
        self.stochastic = True
        #: the noise source (a ``torch.Generator`` on the layer's device); ``None``: the global RNG.
        self.generator: torch.Generator | None = None
        #: the batch holds this many copies of itself along dim 0 (one per Monte Carlo sample; see :func:`tiled`).
        self.tiles = 1

    def variational_params(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        """``(logical name suffix, μ, ℓ)``: ``("weight", weight_mu, weight_logvar)`` and the bias if any."""
        yield "weight", self.weight_mu, self.weight_logvar
        if self.bias_mu is not None:
            yield "bias", self.bias_mu, self.bias_logvar

    def kl(self, prior_mean: dict[str, Tensor], prior_precision: dict[str, Tensor]) -> Tensor:
        """KL from this layer's ``q`` to a prior given per logical suffix (``"weight"``, ``"bias"``)."""
        return sum(diag_gaussian_kl(mu, lv, prior_mean[k], prior_precision[k]) for k, mu, lv in self.variational_params())

    def _sample(self, mean: Tensor, var: Tensor, copies: int = 1) -> Tensor:
        """``mean + sqrt(var) ⊙ ε``, with ``copies`` independent draws stacked along dim 0."""
        shape = (copies, *mean.shape) if copies > 1 else mean.shape
        if self.generator is None:
            eps = torch.randn(shape, dtype=mean.dtype, device=mean.device)
        else:
            eps = torch.randn(shape, generator=self.generator, dtype=mean.dtype, device=mean.device)
        out = mean + var.clamp_min(_MIN_VAR).sqrt() * eps
        return out.reshape(-1, *mean.shape[1:]) if copies > 1 else out

    def _untile(self, x: Tensor) -> tuple[Tensor, int]:
        """``(x[:B], k)`` if ``x`` is ``k = self.tiles`` copies of one batch ``x[:B]`` along dim 0, else ``(x, 1)``.

        Only the first variational layers of a network see such an input (noise makes the copies differ after
        them); they compute the mean and variance of their output once and draw ``k`` samples of it. The test
        compares the first two copies (cheap beside the matmul): the copies are built by :func:`tiled` from one
        batch, so they differ only if something stochastic (dropout) ran before this layer.
        """
        k = self.tiles
        if k <= 1 or not self.stochastic or x.dim() == 0 or x.shape[0] % k:
            return x, 1
        b = x.shape[0] // k
        return (x[:b], k) if torch.equal(x[:b], x[b:2 * b]) else (x, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, logvar_init={self.logvar_init}, stochastic={self.stochastic}"


class BayesLinear(_BayesLayer):
    """Mean-field Gaussian ``nn.Linear`` with the local reparameterisation trick.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        logvar_init: initial log-variance of every weight and bias: a finite constant (−6 by default, as in
            VCL), or ``"fan_in"`` / ``"fan_in:<r>"`` for ``log(r / (3 in_features))`` (see :mod:`.variational_init`).
        weight, bias_init: initial means (default: ``nn.Linear``'s initialisation).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 logvar_init: LogvarSpec = DEFAULT_LOGVAR_INIT, weight: Tensor | None = None,
                 bias_init: Tensor | None = None, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(out_features, "out_features")
        resolve_logvar_init(logvar_init)
        self.in_features, self.out_features = in_features, out_features
        if weight is None:
            ref = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
            weight, bias_init = ref.weight, ref.bias
        self._init_params(weight, bias_init if bias else None, logvar_init)

    @classmethod
    def from_linear(cls, layer: nn.Linear, logvar_init: LogvarSpec = DEFAULT_LOGVAR_INIT) -> BayesLinear:
        return cls(layer.in_features, layer.out_features, layer.bias is not None, logvar_init,
                   weight=layer.weight, bias_init=layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.stochastic:
            return F.linear(x, self.weight_mu, self.bias_mu)
        x, copies = self._untile(x)
        mean = F.linear(x, self.weight_mu, self.bias_mu)
        var = F.linear(x * x, self.weight_logvar.exp(), None if self.bias_logvar is None else self.bias_logvar.exp())
        return self._sample(mean, var, copies)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias_mu is not None}, logvar_init={self.logvar_init}, stochastic={self.stochastic}"


class BayesConv2d(_BayesLayer):
    """Mean-field Gaussian ``nn.Conv2d`` (``padding_mode="zeros"``) with local reparameterisation.

    Built from an ``nn.Conv2d`` by :meth:`from_conv` (or :func:`convert`); stride, padding, dilation and groups are
    kept. Each output entry is sampled from its exact marginal; noise is independent across output positions.
    """

    def __init__(self, conv: nn.Conv2d, logvar_init: LogvarSpec = DEFAULT_LOGVAR_INIT) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}.")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported by BayesConv2d; allowed: 'zeros'.")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._init_params(conv.weight, conv.bias, logvar_init)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, logvar_init: LogvarSpec = DEFAULT_LOGVAR_INIT) -> BayesConv2d:
        return cls(conv, logvar_init)

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if not self.stochastic:
            return self._conv(x, self.weight_mu, self.bias_mu)
        x, copies = self._untile(x)
        mean = self._conv(x, self.weight_mu, self.bias_mu)
        var = self._conv(x * x, self.weight_logvar.exp(),
                         None if self.bias_logvar is None else self.bias_logvar.exp())
        return self._sample(mean, var, copies)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, " \
               f"padding={self.padding}, bias={self.bias_mu is not None}, logvar_init={self.logvar_init}"


BayesLayer = _BayesLayer
SUPPORTED = (nn.Linear, nn.Conv2d)


# --------------------------------------------------------------------------------------------------- the swap
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def convert(module: nn.Module, logvar_init: LogvarSpec = DEFAULT_LOGVAR_INIT,
            include: Callable[[str], bool] | str | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` inside ``module`` for its variational layer, in place.

    Idempotent: layers that are variational already are kept as they are (with their parameters). The new
    means are the layers' current weights, the log-variances ``logvar_init``.

    Args:
        module: the model (its own type may be ``nn.Linear``; then a new layer is returned, not swapped).
        logvar_init: initial log-variance: a finite constant, or ``"fan_in"`` / ``"fan_in:<r>"`` for
            ``log(r / (3 fan_in))`` per layer (``r`` times PyTorch's default init variance; :mod:`.variational_init`).
        include: which layers to convert, by module path: a callable ``path -> bool`` or a regular expression
            (``re.search`` on the *logical weight name* ``"<path>.weight"``); ``None`` converts all.

    Returns:
        ``module`` (or the new layer when ``module`` itself is a plain layer).

    Raises:
        ValueError: the module holds no supported layer and no variational one; the message names the layer
            types found.
    """
    lv = resolve_logvar_init(logvar_init)
    if isinstance(include, str):
        pattern = re.compile(include)
        keep: Callable[[str], bool] = lambda path: bool(pattern.search(_join(path, "weight")))
    elif include is None:
        keep = lambda path: True
    elif callable(include):
        keep = include
    else:
        raise TypeError(f"include must be a callable, a regular expression or None, got {type(include).__name__}.")

    def swap(layer: nn.Module) -> nn.Module:
        new = BayesLinear.from_linear(layer, lv) if isinstance(layer, nn.Linear) else BayesConv2d(layer, lv)
        return new.to(device=layer.weight.device, dtype=layer.weight.dtype).train(layer.training)

    if isinstance(module, SUPPORTED) and not isinstance(module, _BayesLayer):
        return swap(module)
    found = 0
    for path, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            child_path = _join(path, name)
            if isinstance(child, _BayesLayer):
                found += 1
            elif isinstance(child, SUPPORTED) and keep(child_path):
                setattr(parent, name, swap(child))
                found += 1
    if found == 0 and not isinstance(module, _BayesLayer):
        types = sorted({type(m).__name__ for m in module.modules()})
        raise ValueError(f"convert found no supported layer (nn.Linear, nn.Conv2d) to make variational in "
                         f"{type(module).__name__}; layer types found: {types}.")
    return module


def variational_layers(module: nn.Module) -> dict[str, _BayesLayer]:
    """The variational layers of ``module`` by module path (in ``named_modules`` order)."""
    return {path: m for path, m in module.named_modules() if isinstance(m, _BayesLayer)}


def logical_names(module: nn.Module) -> dict[str, tuple[str, str]]:
    """Logical parameter name -> ``(mean parameter name, log-variance parameter name)``.

    >>> m = convert(nn.Sequential(nn.Linear(2, 3)))
    >>> logical_names(m)["0.weight"]
    ('0.weight_mu', '0.weight_logvar')
    """
    out = {}
    for path, layer in variational_layers(module).items():
        for k, _, _ in layer.variational_params():
            out[_join(path, k)] = (_join(path, f"{k}_mu"), _join(path, f"{k}_logvar"))
    return out


def _logical_tensors(module: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    return {_join(path, k): (mu, lv) for path, layer in variational_layers(module).items()
            for k, mu, lv in layer.variational_params()}


def layer_posterior(module: nn.Module, names: list[str] | None = None) -> DiagGaussian:
    """The mean-field ``q`` of the variational layers as a :class:`DiagGaussian` over logical names
    (mean ``weight_mu``, variance ``exp(weight_logvar)``); ``names`` restricts (and orders) them."""
    tensors = _logical_tensors(module)
    if names is None:
        names = list(tensors)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"parameter {missing[0]!r} is not a variational parameter of {type(module).__name__}; "
                       f"known: {', '.join(tensors) or '(none)'}.")
    return DiagGaussian.from_mean_precision({n: tensors[n][0].detach().clone() for n in names},
                                            {n: torch.exp(-tensors[n][1].detach()) for n in names})


@torch.no_grad()
def load_posterior(module: nn.Module, q: DiagGaussian, names: list[str] | None = None) -> None:
    """Set ``μ`` and ``ℓ = log σ²`` of the layers from ``q`` (over logical names; ``names`` restricts)."""
    tensors = _logical_tensors(module)
    names = list(q.names) if names is None else list(names)
    for n in names:
        if n not in tensors:
            raise KeyError(f"parameter {n!r} of the posterior is not a variational parameter of "
                           f"{type(module).__name__}.")
    mean, prec = q.mean, q.precision
    for n in names:
        mu, lv = tensors[n]
        mu.copy_(mean[n].to(mu))
        lv.copy_((-torch.log(prec[n])).to(lv))


def set_stochastic(module: nn.Module, stochastic: bool) -> None:
    """Sample (``True``) or use the means only (``False``) in every variational layer of ``module``."""
    for layer in variational_layers(module).values():
        layer.stochastic = bool(stochastic)


def tile_batch(batch: object, k: int) -> object:
    """``batch`` with every tensor of dimension >= 1 (also inside tuples, lists and dicts) repeated ``k`` times
    along dim 0; anything else is left as it is.

    (``torch.cat``: ``Tensor.repeat`` is several times slower on image batches.)
    """
    if isinstance(batch, Tensor) and batch.dim() > 0:
        return torch.cat([batch] * k)
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(tile_batch(v, k) for v in batch)
    if isinstance(batch, tuple):  # a namedtuple
        return type(batch)(*(tile_batch(v, k) for v in batch))
    if isinstance(batch, dict):
        return type(batch)((key, tile_batch(v, k)) for key, v in batch.items())
    return batch


def set_tiles(module: nn.Module, samples: int) -> None:
    """Tell the variational layers of ``module`` that their batches hold ``samples`` copies of one batch (see
    :func:`tiled`; ``1``: plain batches)."""
    check_positive_int(samples, "samples")
    for layer in variational_layers(module).values():
        layer.tiles = samples


@contextmanager
def tiled(module: nn.Module, batch: object, samples: int):
    r"""Run ``samples`` Monte Carlo samples of ``module`` as one forward pass over a repeated batch.

    Yields ``batch`` with every tensor (of dimension >= 1, in tuples, lists and dicts) repeated ``samples``
    times along dim 0; inside the block the variational layers know it. Local reparameterisation draws fresh noise
    for every row, so the ``k·B`` rows are ``k`` independent samples of the network on the batch, and a loss that is
    a batch mean is their average, :math:`rac1k\sum_s rac1B\sum_i \ell(f_s(x_i), y_i)`. The first variational
    layer computes its output mean and variance once, on ``B`` rows (``_untile``); only the noise and the layers
    after it see ``k·B`` rows, in one call each instead of ``k``.
    """
    check_positive_int(samples, "samples")
    if samples == 1:
        yield batch
        return
    set_tiles(module, samples)
    try:
        yield tile_batch(batch, samples)
    finally:
        set_tiles(module, 1)


def is_stochastic(module: nn.Module) -> bool:
    return any(layer.stochastic for layer in variational_layers(module).values())
