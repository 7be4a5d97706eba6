r"""The initial log-variance of a variational layer: one constant, or scaled to the layer's fan-in.

A constant ``ℓ₀`` (VCL's ``−6``, ``σ ≈ 0.05``) means very different noise in different layers, because the weight
scale of PyTorch's default initialisation depends on the fan-in. ``nn.Linear`` and ``nn.Conv2d`` draw weights
and biases from ``U(−1/√fan_in, 1/√fan_in)`` (``kaiming_uniform_(a=√5)``), so

.. math::  \mathrm{Var}_\text{init}(w) = \frac{1}{3\,\mathrm{fan\_in}},\qquad
           \mathrm{fan\_in} = \frac{\text{in\_channels}}{\text{groups}}\cdot k_h k_w \ \ (\text{conv}),\quad
           \text{in\_features} \ \ (\text{linear}).

A 784→256 linear layer has init std ≈ 0.021 (σ = 0.05 is 2.4× that), a 5×5 convolution over one channel
≈ 0.115. The fan-in rule sets, for the weights and the bias of every layer,

.. math::  \sigma_0^2 = r \cdot \mathrm{Var}_\text{init}(w) = \frac{r}{3\,\mathrm{fan\_in}},\qquad
           \ell_0 = \log r - \log(3\,\mathrm{fan\_in}).

With inputs of comparable scale this fixes the *noise-to-signal ratio* of every pre-activation at
initialisation: :math:`\mathrm{Var}[b] = \sum_i x_i^2 \sigma_0^2 = r \sum_i x_i^2\,\mathrm{Var}_\text{init}(w)`, ``r``
times the variance of the mean pre-activation over random initialisations, whatever the layer's width.

Spelled ``logvar_init="fan_in"`` (ratio :data:`DEFAULT_FAN_IN_RATIO`) or ``"fan_in:<r>"`` (e.g. ``"fan_in:0.1"``);
a real number keeps the old constant. :func:`resolve_logvar_init` parses the spelling once into a
:class:`LogvarInit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

#: The constant of VCL (Nguyen et al. 2018), the layers' default.
DEFAULT_LOGVAR_INIT = -6.0
#: ``r`` of ``"fan_in"``: initial variance = r × the default init's weight variance. Best on the SmallCNN's
#: validation data; a multi-head MLP's second task preferred r = 3 (benchmarks/results/vcl-init/README.md).
DEFAULT_FAN_IN_RATIO = 0.1
FAN_IN = "fan_in"

_ALLOWED = ("a finite real number (one log-variance for every weight), 'fan_in' or 'fan_in:<ratio>' with a "
            "finite ratio > 0 (variance = ratio / (3 fan_in))")


def fan_in(weight: Tensor) -> int:
    """Inputs per output unit of a ``nn.Linear`` / ``nn.Conv2d`` weight: ``weight[0].numel()``.

    ``(out, in)`` gives ``in``; ``(out, in/groups, kh, kw)`` gives ``in/groups · kh · kw`` (as
    ``torch.nn.init``'s fan-in).
    """
    if weight.dim() < 2:
        raise ValueError(f"fan_in needs a weight with at least 2 dimensions (out, in, ...), got shape "
                         f"{tuple(weight.shape)}.")
    return int(weight[0].numel())


@dataclass(frozen=True)
class LogvarInit:
    """How a layer's log-variances start.

    Attributes:
        rule: ``"constant"`` (every entry ``value``) or ``"fan_in"`` (``log(value / (3 fan_in))``).
        value: the constant log-variance, or the ratio ``r`` of the fan-in rule.
    """

    rule: str
    value: float

    def logvar(self, weight: Tensor) -> float:
        """The initial log-variance of the weights and the bias of the layer whose weight is ``weight``."""
        if self.rule == FAN_IN:
            return math.log(self.value) - math.log(3.0 * fan_in(weight))
        return self.value

    def spec(self) -> float | str:
        """The spelling this was parsed from (a float, or ``"fan_in:<r>"``)."""
        return f"{FAN_IN}:{self.value:g}" if self.rule == FAN_IN else self.value

    def __str__(self) -> str:
        return str(self.spec())


def resolve_logvar_init(logvar_init: object, name: str = "logvar_init") -> LogvarInit:
    """Parse ``logvar_init`` (a real number, ``"fan_in"``, ``"fan_in:<r>"`` or a :class:`LogvarInit`).

    Raises:
        TypeError: neither a real number nor a string (booleans are refused).
        ValueError: a non-finite number, an unknown string or a ratio that is not a finite number ``> 0``.
    """
    if isinstance(logvar_init, LogvarInit):
        return logvar_init
    if isinstance(logvar_init, str):
        text = logvar_init.strip().lower()
        head, sep, tail = text.partition(":")
        if head != FAN_IN:
            raise ValueError(f"{name}={logvar_init!r} is not valid; allowed: {_ALLOWED}.")
        if not sep:
            return LogvarInit(FAN_IN, DEFAULT_FAN_IN_RATIO)
        try:
            ratio = float(tail)
        except ValueError:
            ratio = float("nan")
        if not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"{name}={logvar_init!r} has an invalid ratio {tail!r}; allowed: {_ALLOWED}.")
        return LogvarInit(FAN_IN, ratio)
    if isinstance(logvar_init, bool) or not isinstance(logvar_init, (int, float)):
        raise TypeError(f"{name} must be a real number or a string, got {type(logvar_init).__name__} "
                        f"{logvar_init!r}; allowed: {_ALLOWED}.")
    if not math.isfinite(float(logvar_init)):
        raise ValueError(f"{name}={logvar_init!r} is not allowed; allowed: {_ALLOWED}.")
    return LogvarInit("constant", float(logvar_init))

