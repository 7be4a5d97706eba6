"""Which parameters and which layers carry a posterior: the one parameter selection and the one layer discovery
that every part of bayescl uses (Gaussians, curvature, callbacks, the strategy, the plugins).

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
>>> list(select_params(model, param_filter(["^2\\\\."])))
['2.weight', '2.bias']
>>> linear_layers(model)
{'0': ('0.weight', '0.bias'), '2': ('2.weight', '2.bias')}
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

from torch import Tensor, nn

#: the layer types with a Kronecker-factored block
KRON_LAYER_TYPES = (nn.Linear, nn.Conv2d)

NameFilter = Callable[[str], bool]


def param_filter(patterns: Sequence[str] | None, name: str = "params") -> NameFilter | None:
    """A predicate on parameter names from regular expressions (``re.search``); ``None`` keeps every name.

    Raises:
        TypeError: ``patterns`` is a bare string or holds something else than strings.
        ValueError: a pattern is not a valid regular expression (the message names ``name`` and the pattern).
    """
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a list of regular expressions (str) or None, got {patterns!r}.")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"{name} holds {p!r}, which is not a valid regular expression: {err}.") from None

    def keep(n: str) -> bool:
        return any(r.search(n) for r in compiled)

    keep.patterns = list(patterns)  # type: ignore[attr-defined]
    return keep


def select_params(
    model: nn.Module, include: NameFilter | Collection[str] | None = None, *, what: str = "params"
) -> dict[str, nn.Parameter]:
    """The trainable parameters of ``model`` that ``include`` keeps, by name, in the model's order.

    Args:
        model: the module.
        include: ``None`` (every trainable parameter), a predicate on names (see :func:`param_filter`) or a
            collection of exact names (every one must exist).
        what: the argument name used in error messages.

    Raises:
        ValueError: exact names that are not parameters, or nothing selected.
    """
    named = dict(model.named_parameters())
    if include is not None and not callable(include):
        wanted = [include] if isinstance(include, str) else list(include)
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise ValueError(f"{what} names {unknown}, which are not parameters of the model; allowed: {list(named)}.")
        keep: NameFilter = set(wanted).__contains__
    else:
        keep = include if include is not None else (lambda n: True)
    out = {n: p for n, p in named.items() if p.requires_grad and keep(n)}
    if not out:
        pats = getattr(include, "patterns", include)
        raise ValueError(f"{what}={pats!r} selects no trainable parameter of {type(model).__name__}.")
    return out


def linear_layers(
    model: nn.Module, params: Mapping[str, Tensor] | Collection[str] | None = None, layers: Iterable[str] | None = None
) -> dict[str, tuple[str, str | None]]:
    """``{layer: (weight name, bias name or None)}`` for every ``nn.Linear`` / ``nn.Conv2d`` whose weight is kept.

    A weight is kept when it is trainable and, if ``params`` is given, named in it; the bias is ``None`` when the
    layer has none or it is not kept. ``layers`` restricts to the named modules (each must be Linear/Conv2d).
    May be empty; callers that need a layer say so in their own words.
    """
    modules = dict(model.named_modules())
    if layers is not None:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        bad = [n for n in wanted if n not in modules or not isinstance(modules[n], KRON_LAYER_TYPES)]
        if bad:
            allowed = [n for n, m in modules.items() if isinstance(m, KRON_LAYER_TYPES)]
            raise ValueError(f"layers names {bad}, which are not nn.Linear/nn.Conv2d modules; allowed: {allowed}.")
        modules = {n: modules[n] for n in wanted}

    def kept(p: Tensor | None, name: str) -> bool:
        return p is not None and p.requires_grad and (params is None or name in params)

    out: dict[str, tuple[str, str | None]] = {}
    for name, mod in modules.items():
        if not isinstance(mod, KRON_LAYER_TYPES):
            continue
        prefix = f"{name}." if name else ""
        if kept(mod.weight, prefix + "weight"):
            out[name] = (prefix + "weight", prefix + "bias" if kept(mod.bias, prefix + "bias") else None)
    return out


def require_layers(model: nn.Module, found: Mapping[str, object], what: str) -> None:
    """Raise ``ValueError`` naming the module types of ``model`` when ``found`` (from :func:`linear_layers`) is
    empty; ``what`` says who needs the layer."""
    if not found:
        types = sorted({type(m).__name__ for m in model.modules() if list(m.parameters(recurse=False))})
        raise ValueError(f"{what} needs a trainable nn.Linear or nn.Conv2d layer; module types found: {types}.")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module of ``model`` in ``eval()`` mode and restore each module's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)
