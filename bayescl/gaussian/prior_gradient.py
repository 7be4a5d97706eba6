"""The one path by which a Gaussian prior reaches the optimizer: ``p.grad += scale · (Λθ − η)``, fused, shared by
the callbacks, the Avalanche plugins and the distributed strategy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bayescl.gaussian.kinds import Gaussian, check_gaussian
from bayescl.gaussian.kron_block import from_block, to_block


class PriorGradient:
    r"""``grad += scale · (Λθ − η)`` for one Gaussian and a fixed list of parameters, fused: the numbers of
    ``q.quadratic_grad`` (then ``add``) up to float32 rounding (a Kronecker ``quadratic_grad`` works in float64, so
    that it vanishes at the mean), without its temporaries. The elementwise part ``D ⊙ θ − η``
    (``q.elementwise_precision()``; all of ``Λ`` for a :class:`~bayescl.gaussian.diag.DiagGaussian`) is two
    ``_foreach`` passes over memory; each Kronecker block of ``q.blocks()`` whose parameters are all in
    ``params`` then adds its ``Σ s_i G_i W̃ A_i`` to the weight and bias gradients. ``q`` is moved once to the
    parameters' device and dtype.

    Args:
        q: the Gaussian (its names must cover ``params``).
        params: name -> parameter, in the order the gradients are added.
    """

    def __init__(self, q: Gaussian, params: Mapping[str, Tensor]) -> None:
        self.q, self.names = check_gaussian(q, "q"), tuple(params)
        ref = next(iter(params.values()))
        qd = q.to(device=ref.device, dtype=ref.dtype)
        diag = qd.elementwise_precision()
        self._diag = [diag[n].to(p).contiguous() for n, p in params.items()]
        self._eta = [qd.eta[n].to(p) for n, p in params.items()]
        self._blocks = [blk for blk in qd.blocks().values()
                        if blk.terms and all(n is None or n in params for n in blk.spec)]

    @torch.no_grad()
    def add_(self, params: Mapping[str, Tensor], scale: float) -> None:
        """``p.grad += scale · (Λθ − η)`` for every parameter (a missing ``.grad`` starts at zero)."""
        ps = [params[n] for n in self.names]
        for p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads, thetas = [p.grad for p in ps], [p.detach() for p in ps]
        torch._foreach_addcmul_(grads, self._diag, thetas, value=scale)
        torch._foreach_add_(grads, self._eta, alpha=-scale)
        for blk in self._blocks:
            kb = blk.apply(to_block(blk.spec, {n: params[n].detach() for n in blk.spec if n is not None}))
            for n, v in from_block(blk.spec, kb, params).items():
                params[n].grad.add_(v, alpha=scale)


@torch.no_grad()
def add_scaled_grads(params: Mapping[Any, nn.Parameter], grads: Mapping[Any, Tensor], scale: float) -> None:
    """``p.grad += scale · grads[name]`` (creating ``.grad`` where it is ``None``): the one way a prior term
    reaches the optimizer, shared by the callbacks, the Avalanche plugins and the distributed strategy."""
    for n, p in params.items():
        g = grads[n].to(p.dtype)
        if p.grad is None:
            p.grad = g * scale
        else:
            p.grad.add_(g, alpha=scale)
