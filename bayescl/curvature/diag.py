r"""Curvature of the negative log-likelihood at a model's current weights, summed over a dataloader.

The Laplace site of a task with data :math:`\{(x_n, y_n)\}_{n=1}^N` at its optimum :math:`\theta^*` has precision
:math:`\Lambda = \sum_n F_n` (``N`` times the average Fisher) and natural mean :math:`\eta = \Lambda\theta^*`.
Every function here returns that **sum** over examples; nothing is divided by ``N``.

With logits :math:`f_n = f(x_n;\theta)`, Jacobian :math:`J_n = \partial f_n/\partial\theta` and per-example loss
:math:`\ell(f_n, y) = -\log p(y\mid f_n)`, the diagonal estimators of :class:`FisherType` are

* ``"exact"``: :math:`\sum_n \sum_c p_{nc}\,(J_n^\top \nabla_f\ell(f_n, c))^{\odot 2}
  = \sum_n \operatorname{diag}(J_n^\top H_n J_n)`, with :math:`H_n = \operatorname{diag}(p_n) - p_n p_n^\top` for
  softmax cross-entropy: the columns :math:`\sqrt{p_{nc}}\,(p_n - e_c)` of a square root of :math:`H_n` are
  back-propagated, one backward pass per class, no sampling;
* ``"mc"``: the same expectation with :math:`S` labels :math:`\hat y \sim p(y\mid f_n)`,
  :math:`\frac1S\sum_s (J_n^\top\nabla_f\ell(f_n,\hat y_s))^{\odot 2}` (unbiased);
* ``"empirical"``: :math:`\sum_n (J_n^\top\nabla_f\ell(f_n, y_n))^{\odot 2}` at the true labels;
* ``"batch_squared"``: :math:`\sum_b |B_b|\,\bar g_b^{\odot 2}` with :math:`\bar g_b` the *minibatch-mean*
  gradient. This is what Avalanche's EWC accumulates (it reports :math:`\frac{1}{\#b}\sum_b \bar g_b^{\odot 2}`,
  i.e. ours divided by ``N`` for equal batches). It is biased: cross terms :math:`g_n\odot g_m` between examples
  stay in, and as the gradients average out near an optimum it shrinks roughly like ``1/|B|``. For comparison only.

``loss="mse"`` is :math:`\ell = \sum_c (f_c - y_c)^2` (``MSELoss(reduction="sum")`` per row), the Gaussian likelihood
with variance 1/2 and :math:`H = 2I`, the convention of curvlinops so that :func:`kfac` and :func:`diag_fisher`
agree. A callable loss ``(logits, y) -> per-example losses`` (a scalar is read as the batch mean) has no model
distribution, so it allows only ``"empirical"`` and ``"batch_squared"``.

How it is computed: one batched forward, then one backward per label vector (1, ``mc_samples`` or ``C``) taken
with respect to the *outputs* of every ``nn.Linear`` (called once on a 2-D input) and ``nn.Conv2d`` (called once,
zero padding, ``groups=1``); the per-example squared weight gradients are then
:math:`\sum_n (g_n^{\odot 2})(a_n^{\odot 2})^\top` for a linear layer (one matmul, no per-example gradient is
materialised) and :math:`\sum_n (g_n U_n^\top)^{\odot 2}` for a convolution (``U_n`` its unfolded input, one
batched matmul in chunks). Other parameters (normalisation, embeddings, other layers) get per-example gradients from
``torch.func`` (``functional_call`` + ``vmap`` + ``grad``) in memory-bounded chunks. Both assume that in ``eval()``
mode an example's output depends on its own input only (true for standard layers). The model is put in ``eval()``
mode for the pass and every module's mode is restored; parameters and their ``.grad`` are not touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bayescl._checks import as_enum, check_positive_int
from bayescl._params import eval_mode, select_params
from bayescl.curvature.common import (
    FisherType,
    LossType,
    check_finite_outputs,
    check_finite_params,
    check_temperature,
    iter_batches,
    prepare_batch,
)

__all__ = ["diag_fisher"]

_VMAP_FLOATS = 1 << 23  # per-chunk budget for materialised per-example gradients (32 MiB in float32)


def _loss_vectors(
    logits: Tensor, y: Tensor, fisher: FisherType, loss: Any, mc_samples: int, generator: torch.Generator | None,
    temperature: float = 1.0,
) -> list[tuple[Tensor, float]]:
    r"""Vectors :math:`v` on the logits (with weights) such that the per-example Fisher is
    :math:`\sum_k w_k (J_n^\top v_{k,n})^{\odot 2}`; with a temperature those of the likelihood
    :math:`\operatorname{softmax}(f/T)`, i.e. the untempered vectors at :math:`f/T`, divided by :math:`T`."""
    if temperature != 1.0:
        return [(v / temperature, w)
                for v, w in _loss_vectors(logits.detach() / temperature, y, fisher, loss, mc_samples, generator)]
    lg = logits.detach()
    if callable(loss) and not isinstance(loss, LossType):
        if fisher in (FisherType.EXACT, FisherType.MC):
            raise ValueError(
                f"fisher={fisher.value!r} needs a likelihood; with a callable loss only 'empirical' and "
                "'batch_squared' are allowed (or pass loss='ce' / 'mse')."
            )
        lg = lg.clone().requires_grad_(True)
        with torch.enable_grad():
            values = loss(lg, y)
            total = values * lg.shape[0] if values.dim() == 0 else values.sum()
            (v,) = torch.autograd.grad(total, lg)
        return [(v, 1.0)]
    if lg.dim() != 2:
        raise ValueError(f"curvature needs 2-D model outputs (batch, outputs); got shape {tuple(lg.shape)}.")
    B, C = lg.shape
    if loss is LossType.CE:
        p = lg.softmax(-1)
        if fisher is FisherType.EXACT:
            eye = torch.eye(C, dtype=p.dtype, device=p.device)
            return [(p[:, c : c + 1].sqrt() * (p - eye[c]), 1.0) for c in range(C)]
        if fisher is FisherType.MC:
            dev = generator.device if generator is not None else p.device
            labels = torch.multinomial(p.to(dev), mc_samples, replacement=True, generator=generator).to(p.device)
            return [(p - nn.functional.one_hot(labels[:, s], C).to(p), 1.0 / mc_samples) for s in range(mc_samples)]
        return [(p - nn.functional.one_hot(y.long(), C).to(p), 1.0)]
    # Gaussian, loss sum_c (f_c - y_c)^2: gradient 2 (f - y), Hessian 2 I.
    if fisher is FisherType.EXACT:
        eye = torch.eye(C, dtype=lg.dtype, device=lg.device) * 2**0.5
        return [(eye[c].expand(B, C), 1.0) for c in range(C)]
    if fisher is FisherType.MC:
        dev = generator.device if generator is not None else lg.device
        out = []
        for _ in range(mc_samples):
            eps = torch.randn(lg.shape, generator=generator, device=dev, dtype=lg.dtype).to(lg.device)
            out.append((2**0.5 * eps, 1.0 / mc_samples))  # 2 (f - y) with y ~ N(f, 1/2)
        return out
    return [(2 * (lg - y.to(lg)), 1.0)]


def _owners(model: nn.Module) -> dict[int, int]:
    counts: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


def _vmap_sq_grads(
    model: nn.Module,
    targets: dict[str, Tensor],
    inputs: tuple[Tensor, ...],
    vectors: list[tuple[Tensor, float]],
    out: dict[str, Tensor],
) -> None:
    """Add sum_k w_k sum_n (J_n^T v_kn)^2 for ``targets`` through per-example gradients (torch.func)."""
    state = {n: t.detach() for n, t in model.named_parameters()}
    state.update({n: b for n, b in model.named_buffers()})
    tgt = {n: state.pop(n) for n in targets}
    B = vectors[0][0].shape[0]
    dims = tuple(0 if t.dim() > 0 and t.shape[0] == B else None for t in inputs)

    def f(p: dict[str, Tensor], v: Tensor, *inp: Tensor) -> Tensor:
        args = tuple(t.unsqueeze(0) if d == 0 else t for t, d in zip(inp, dims))
        return (functional_call(model, {**state, **p}, args).squeeze(0) * v).sum()

    per_ex = vmap(grad(f), in_dims=(None, 0, *dims))
    numel = sum(t.numel() for t in tgt.values())
    chunk = max(1, min(B, _VMAP_FLOATS // max(numel, 1)))
    for v, w in vectors:
        for s in range(0, B, chunk):
            sl = slice(s, s + chunk)
            grads = per_ex(tgt, v[sl], *(t[sl] if d == 0 else t for t, d in zip(inputs, dims)))
            for n, g in grads.items():
                out[n].add_(g.square().sum(0), alpha=w)


_FAST = (nn.Linear, nn.Conv2d)


def _fast_ok(m: nn.Module, rec: list[tuple[Tensor, Tensor]], B: int, owners: dict[int, int]) -> bool:
    """A layer whose per-example squared gradients follow from its input and output gradient alone."""
    if len(rec) != 1 or rec[0][0].shape[:1] != (B,) or any(owners[id(p)] != 1 for p in m.parameters(False)):
        return False
    if isinstance(m, nn.Linear):
        return rec[0][0].dim() == 2
    return (rec[0][0].dim() == 4 and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _fast_input(m: nn.Module, a: Tensor) -> Tensor:
    """What :func:`_fast_sq` needs from a layer's input, computed once per batch: ``a²`` or the unfolded patches."""
    if isinstance(m, nn.Linear):
        return a.square()
    return nn.functional.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)


def _fast_sq(m: nn.Module, u: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(Σ_n (∂ℓ_n/∂W)², Σ_n (∂ℓ_n/∂b)²)`` from :func:`_fast_input` ``u`` and output gradients ``g`` of one layer.

    Linear: :math:`(g^{\odot2})^\top (a^{\odot2})`. Conv2d: per-example :math:`g_n U_n^\top` with ``U_n`` the
    unfolded input patches (``(out, in·kh·kw)`` per example, in chunks), squared and summed.
    """
    if isinstance(m, nn.Linear):
        g2 = g.square()
        return g2.T @ u, g2.sum(0)
    gf = g.flatten(2)  # (B, out, L)
    w2 = torch.zeros(m.weight.shape[0], u.shape[1], dtype=g.dtype, device=g.device)
    chunk = max(1, _VMAP_FLOATS // w2.numel())
    for s in range(0, g.shape[0], chunk):
        w2 += torch.bmm(gf[s : s + chunk], u[s : s + chunk].transpose(1, 2)).square().sum(0)
    return w2.view_as(m.weight), gf.sum(2).square().sum(0)


def _batch_curvature(
    model: nn.Module,
    targets: dict[str, nn.Parameter],
    inputs: tuple[Tensor, ...],
    y: Tensor,
    fisher: FisherType,
    loss: Any,
    mc_samples: int,
    generator: torch.Generator | None,
    out: dict[str, Tensor],
    index: int = 0,
    temperature: float = 1.0,
) -> None:
    owners = _owners(model)
    target_ids = {id(p): n for n, p in targets.items()}
    records: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {}

    def hook(mod: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        records.setdefault(mod, []).append((args[0].detach(), output))
        return output.clone()  # later in-place ops must not rewrite the recorded output's history

    layers = [m for m in model.modules() if isinstance(m, _FAST) and any(id(p) in target_ids for p in m.parameters(False))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            logits = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    check_finite_outputs(logits, index)
    B = logits.shape[0]
    fast = {m: rec[0] for m, rec in records.items() if _fast_ok(m, rec, B, owners)}
    fast_ids = {id(p) for m in fast for p in m.parameters(False)}
    # Layers that were never called (heads of other tasks) get zero curvature.
    uncalled = {id(p) for m in layers if m not in records for p in m.parameters(False)}
    slow = {n: p for n, p in targets.items() if id(p) not in fast_ids and id(p) not in uncalled}

    if fisher is FisherType.BATCH_SQUARED:
        vecs = _loss_vectors(logits, y, FisherType.EMPIRICAL, loss, 1, None, temperature)
        names = list(targets)
        grads = torch.autograd.grad(logits, [targets[n] for n in names], vecs[0][0] / B, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                out[n].add_(g.square(), alpha=B)
        return
    vectors = _loss_vectors(logits, y, fisher, loss, mc_samples, generator, temperature)
    mods = list(fast)
    zs = [fast[m][1] for m in mods]
    if zs:
        prepared = {m: _fast_input(m, fast[m][0]) for m in mods}
        for k, (v, w) in enumerate(vectors):
            gs = torch.autograd.grad(logits, zs, v, retain_graph=k < len(vectors) - 1, allow_unused=True)
            for m, g in zip(mods, gs):
                if g is None:
                    continue
                w2, b2 = _fast_sq(m, prepared[m], g)
                if id(m.weight) in target_ids:
                    out[target_ids[id(m.weight)]].add_(w2, alpha=w)
                if m.bias is not None and id(m.bias) in target_ids:
                    out[target_ids[id(m.bias)]].add_(b2, alpha=w)
    del logits, zs, fast
    records.clear()
    if slow:
        try:
            _vmap_sq_grads(model, slow, inputs, vectors, out)
        except RuntimeError as err:
            raise RuntimeError(
                f"per-example gradients with torch.func.vmap failed for parameters {list(slow)[:5]} "
                f"(data-dependent control flow in the model's forward?): {err}"
            ) from err


@torch.no_grad()
def diag_fisher(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    fisher: str | FisherType = FisherType.MC,
    loss: str | LossType | Callable[[Tensor, Tensor], Tensor] = LossType.CE,
    mc_samples: int = 1,
    params: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    r"""Diagonal Fisher summed over the examples of ``dataloader``: :math:`\sum_n \operatorname{diag} F_n`.

    Args:
        model: Called as ``model(*inputs)`` with the inputs of :func:`bayescl._batches.split_batch`.
        dataloader: Yields ``(x, y)`` or ``(x, y, task_id)``.
        fisher: ``"exact"``, ``"mc"``, ``"empirical"`` or ``"batch_squared"`` (module docstring).
        loss: ``"ce"`` (softmax cross-entropy on the logits), ``"mse"`` (:math:`\sum_c (f_c-y_c)^2`) or a callable
            ``(logits, y) -> per-example losses`` (a 0-d result is read as the batch mean).
        mc_samples: Sampled labels per example for ``"mc"``.
        params: Names of parameters to include; ``None`` = every parameter with ``requires_grad``. Frozen
            parameters are always skipped.
        generator: Random generator for ``"mc"`` (its device is where labels are drawn).
        max_batches: Use only the first ``max_batches`` batches.
        progress: Show a tqdm progress bar.
        reduce: Applied to the list of summed tensors before they are checked and returned, e.g.
            :func:`bayescl.lightning.distributed.sum_across_ranks` when each process has summed over its own
            examples (every process must then call it).
        temperature: :math:`T > 0`, the curvature of the tempered likelihood :math:`\operatorname{softmax}(f/T)`
            (``loss="ce"`` only; :func:`bayescl.curvature.common.check_temperature` says why). 1: untempered.

    Returns:
        ``{name: tensor}`` with the parameter's shape, dtype and device; layers not used by the data are zero.

    Raises:
        ValueError: bad argument, empty dataloader, non-finite inputs/targets or model outputs (the batch index is
            named; raised before any label is sampled), or a non-finite result (the parameter is named).
    """
    fisher = as_enum(FisherType, fisher, "fisher")
    if not callable(loss) or isinstance(loss, (str, LossType)):
        loss = as_enum(LossType, loss, "loss")
    check_positive_int(mc_samples, "mc_samples")
    temperature = check_temperature(temperature, loss)
    targets = select_params(model, params)
    check_finite_params(targets)
    out = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in targets.items()}
    ref = next(iter(targets.values()))
    with eval_mode(model):
        batches = iter_batches(dataloader, max_batches, progress, f"diag Fisher ({fisher.value})")
        for index, batch in enumerate(batches):
            inputs, y = prepare_batch(batch, ref, index)
            _batch_curvature(model, targets, inputs, y, fisher, loss, mc_samples, generator, out, index,
                             temperature)
    if reduce is not None:
        out = dict(zip(out, reduce(list(out.values()))))
    for n, t in out.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"the diagonal Fisher of parameter {n!r} is not finite (NaN/inf in the model or data).")
    return out
