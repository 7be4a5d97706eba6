r"""Kronecker-factored curvature (KFAC) of ``nn.Linear`` / ``nn.Conv2d`` layers, through curvlinops.

For a layer with weight :math:`W` of shape ``(out, in_flat)`` (a convolution's weight is flattened to
``(out, in·kh·kw)``) and bias :math:`b`, let :math:`\tilde W = [W, b]` of shape ``(out, in_flat + 1)`` and
:math:`\operatorname{vec}` the **row-major** flattening (``W̃.reshape(-1)``). With :math:`\tilde a_n = [a_n; 1]`
the layer input of example ``n`` and :math:`g_n` the gradient of its loss (at a label drawn as ``fisher`` says)
with respect to the layer output, the Fisher block is

.. math::
    \sum_n (g_n g_n^\top) \otimes (\tilde a_n \tilde a_n^\top)
    \;\approx\; G \otimes A, \qquad
    A = \frac1N \sum_n \tilde a_n \tilde a_n^\top, \quad G = \sum_n g_n g_n^\top,

so ``kron(G, A)`` multiplies ``vec(W̃)`` as :math:`\operatorname{vec}(G\tilde W A)` and approximates the **sum**
over the ``N`` examples (``N·F``, the scale of :func:`bayescl.curvature.diag_fisher`). It is exact when the
:math:`g_n g_n^\top` are equal for all ``n`` (a single example; a linear model with Gaussian likelihood) and
otherwise the usual KFAC independence approximation. ``fisher="mc"`` averages ``mc_samples`` sampled labels;
``"exact"`` back-propagates the columns of the square root of the loss Hessian (curvlinops' type-2 Fisher).
For convolutions, ``kfac_approx`` picks KFAC-expand or KFAC-reduce (Eschenhagen et al. 2023); for linear layers
on 2-D inputs both coincide. The factors are computed by ``curvlinops.KFACLinearOperator`` with a sum-reduced
loss (``separate_weight_and_bias=False``: the bias is the last input column) in one pass over the data; ``A``
is rescaled by the number of examples counted during that pass.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bayescl._checks import as_enum, check_positive_int
from bayescl._params import eval_mode, linear_layers, require_layers, select_params
from bayescl.curvature.common import (
    FisherType,
    LossType,
    check_finite_outputs,
    check_finite_params,
    check_temperature,
    iter_batches,
    prepare_batch,
)


class KFACApprox(str, enum.Enum):
    """KFAC-expand or KFAC-reduce for weight-sharing layers (convolutions)."""

    EXPAND = "expand"
    REDUCE = "reduce"


class _Data:
    """Re-iterable ``(X, y)`` view of a bayescl dataloader that counts the examples of its last full pass and
    remembers the index of the batch being served (for :class:`_Wrapped`'s error message). Inputs and targets are
    checked finite (:func:`~bayescl.curvature.common.prepare_batch`) before curvlinops sees them."""

    def __init__(self, dataloader: Iterable[Any], max_batches: int | None, progress: bool, ref: Tensor) -> None:
        self.dataloader, self.max_batches, self.progress, self.ref = dataloader, max_batches, progress, ref
        self.count = 0
        self.index = 0

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        self.count = 0
        for index, batch in enumerate(iter_batches(self.dataloader, self.max_batches, self.progress, "KFAC")):
            self.index = index
            inputs, y = prepare_batch(batch, self.ref, index)
            self.count += inputs[0].shape[0]
            yield (inputs[0] if len(inputs) == 1 else {"inputs": inputs}), y


class _Wrapped(nn.Module):
    """Calls ``model(*inputs)`` and adds ``0·Σθ`` so that layers the data does not use (other tasks' heads) stay in
    the graph: curvlinops differentiates all given parameters and would fail on unused ones. Non-finite outputs are
    refused here, before curvlinops samples labels from them (``torch.multinomial`` would fail obscurely)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], data: _Data, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self._params = params
        self._data = data
        self._temperature = temperature

    def forward(self, X: Any) -> Tensor:
        out = self.model(*X["inputs"]) if isinstance(X, dict) else self.model(X)
        check_finite_outputs(out, self._data.index)
        if self._temperature != 1.0:  # the tempered likelihood softmax(f/T): curvlinops sees f/T
            out = out / self._temperature
        return out + 0.0 * sum(p.sum() for p in self._params)


def kfac(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    fisher: str | FisherType = FisherType.MC,
    loss: str | LossType = LossType.CE,
    kfac_approx: str | KFACApprox = KFACApprox.EXPAND,
    mc_samples: int = 1,
    layers: Iterable[str] | None = None,
    params: Iterable[str] | None = None,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    temperature: float = 1.0,
) -> dict[str, tuple[Tensor, Tensor]]:
    r"""KFAC factors ``{layer_name: (A, G)}`` with ``kron(G, A)`` ≈ the summed Fisher block of ``[W, b]``.

    Args:
        model: Called as ``model(*inputs)`` (see :func:`bayescl._batches.split_batch`); put in ``eval()`` mode for
            the pass and restored.
        dataloader: Yields ``(x, y)`` or ``(x, y, task_id)``.
        fisher: ``"mc"``, ``"exact"`` (type-2) or ``"empirical"``.
        loss: ``"ce"`` or ``"mse"`` (:math:`\sum_c (f_c - y_c)^2` per example).
        kfac_approx: ``"expand"`` or ``"reduce"`` (matters for convolutions only).
        mc_samples: Sampled labels per example for ``"mc"``.
        layers: Module names to include; ``None`` = every trainable Linear/Conv2d layer.
        params: Parameter names to include; ``None`` = every trainable one. A layer is included when its weight
            is; its bias only when it is named too (else ``A`` has no bias row).
        generator: Seeds the label sampling of ``"mc"`` (one integer is drawn from it).
        max_batches: Use only the first ``max_batches`` batches.
        progress: Show a tqdm progress bar.
        reduce: Applied to the list of this pass's sums (every layer's ``Σ ã ãᵀ`` and ``G``, then the example count
            as an int64 tensor) before ``A`` is divided by the count, e.g.
            :func:`bayescl.lightning.distributed.sum_across_ranks` when each process has passed over its own
            examples: ``A`` is then the average over all processes' examples and ``G`` their sum.
        temperature: :math:`T > 0`, the curvature of the tempered likelihood :math:`\operatorname{softmax}(f/T)`
            (``loss="ce"`` only, see :func:`bayescl.curvature.common.check_temperature`); 1: untempered.

    Returns:
        ``A`` of shape ``(in_flat + 1, in_flat + 1)`` (``in_flat`` without a trainable bias) and ``G`` of shape
        ``(out, out)``, in the weight's dtype and device. Layers the data never reaches have zero factors.

    Raises:
        ValueError: no such layer among the selected parameters, a bad argument, non-finite inputs/targets or
            model outputs (the batch index is named; raised before curvlinops samples labels), or non-finite
            factors.
    """
    selected = None if params is None else select_params(model, params)
    mapping = linear_layers(model, selected, layers)
    require_layers(model, mapping, "KFAC")
    return kfac_for_layers(model, dataloader, mapping, fisher=fisher, loss=loss, kfac_approx=kfac_approx,
                           mc_samples=mc_samples, generator=generator, max_batches=max_batches, progress=progress,
                           reduce=reduce, temperature=temperature)


def kfac_for_layers(
    model: nn.Module,
    dataloader: Iterable[Any],
    mapping: Mapping[str, tuple[str, str | None]],
    *,
    fisher: str | FisherType = FisherType.MC,
    loss: str | LossType = LossType.CE,
    kfac_approx: str | KFACApprox = KFACApprox.EXPAND,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
    temperature: float = 1.0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`kfac` for layers already discovered: ``mapping`` is ``{layer: (weight name, bias name or None)}``
    from :func:`bayescl._params.linear_layers` (not empty); the other arguments as for :func:`kfac`."""
    try:
        from curvlinops import KFACLinearOperator
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("kfac needs curvlinops: pip install 'bayescl[kfac]'.") from err
    fisher = as_enum(FisherType, fisher, "fisher")
    if fisher is FisherType.BATCH_SQUARED:
        raise ValueError("fisher='batch_squared' is not available for kfac; allowed: 'mc', 'exact', 'empirical'.")
    loss = as_enum(LossType, loss, "loss")
    kfac_approx = as_enum(KFACApprox, kfac_approx, "kfac_approx")
    check_positive_int(mc_samples, "mc_samples")
    temperature = check_temperature(temperature, loss)
    if fisher is not FisherType.MC and mc_samples != 1:
        raise ValueError(f"mc_samples={mc_samples} is only allowed with fisher='mc'; use 1 for {fisher.value!r}.")
    named = dict(model.named_parameters())
    params = [named[n] for pair in mapping.values() for n in pair if n is not None]
    check_finite_params({n: named[n] for pair in mapping.values() for n in pair if n is not None})
    seed = 2147483647 if generator is None else int(torch.randint(2**31 - 1, (1,), generator=generator))
    data = _Data(dataloader, max_batches, progress, params[0])
    wrapped = _Wrapped(model, params, data, temperature)
    loss_func = nn.CrossEntropyLoss(reduction="sum") if loss is LossType.CE else nn.MSELoss(reduction="sum")
    curvlinops_fisher = {FisherType.EXACT: "type-2", FisherType.MC: "mc", FisherType.EMPIRICAL: "empirical"}
    with eval_mode(model):
        op = KFACLinearOperator(
            wrapped,
            loss_func,
            params,
            data,
            check_deterministic=False,
            seed=seed,
            fisher_type=curvlinops_fisher[fisher],
            mc_samples=mc_samples,
            kfac_approx=kfac_approx.value,
            num_per_example_loss_terms=1,
            separate_weight_and_bias=False,
            num_data=1,  # A is divided by the true count below
            batch_size_fn=lambda X: (X["inputs"][0] if isinstance(X, dict) else X).shape[0],
        )
        op.compute_kronecker_factors()
    state = op.state_dict()
    A_all, G_all = state["input_covariances"], state["gradient_covariances"]
    sums: dict[str, tuple[Tensor | None, Tensor | None]] = {}  # (Σ ã ãᵀ, G); None: the data never reached it
    for layer, (w_name, b_name) in mapping.items():
        key = f"model.{layer}" if layer else "model"
        sums[layer] = (A_all.get(key), G_all.get(key))
    count: int | Tensor = data.count
    if reduce is not None:  # zeros for the unreached layers: every process reduces the same list
        full = []
        for layer, (w_name, b_name) in mapping.items():
            w = named[w_name]
            n_in = w[0].numel() + (b_name is not None)
            A, G = sums[layer]
            full += [torch.zeros(n_in, n_in, dtype=w.dtype, device=w.device) if A is None else A,
                     torch.zeros(w.shape[0], w.shape[0], dtype=w.dtype, device=w.device) if G is None else G]
        reduced = reduce([*full, torch.tensor(count, dtype=torch.int64, device=params[0].device)])
        sums = {layer: (reduced[2 * i], reduced[2 * i + 1]) for i, layer in enumerate(mapping)}
        count = int(reduced[-1])
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for layer, (w_name, b_name) in mapping.items():
        w = named[w_name]
        n_in = w[0].numel() + (b_name is not None)
        A, G = sums[layer]
        A = torch.zeros(n_in, n_in, dtype=w.dtype, device=w.device) if A is None else A / count
        G = torch.zeros(w.shape[0], w.shape[0], dtype=w.dtype, device=w.device) if G is None else G
        for what, t in (("A", A), ("G", G)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"the KFAC factor {what} of layer {layer!r} is not finite (NaN/inf in model or data).")
        out[layer] = (A, G)
    return out
