r"""The one elementwise Gaussian KL and its closed-form gradient, shared by :meth:`DiagGaussian.kl
<bayescl.gaussian.diag.DiagGaussian.kl>`, the mean-field variational layers and the VCL callback.

For :math:`q = \mathcal N(\mu, e^{\ell})` and :math:`p = \mathcal N(\mu_p, 1/\lambda_p)` elementwise,

.. math::

    \mathrm{KL}(q \,\|\, p) = \tfrac12 \textstyle\sum \big[\lambda_p e^{\ell} + \lambda_p (\mu - \mu_p)^2 - 1
    - \log \lambda_p - \ell\big],\qquad
    \nabla_\mu = \lambda_p (\mu - \mu_p),\quad \nabla_\ell = \tfrac12 (\lambda_p e^{\ell} - 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def diag_gaussian_kl(mu: Tensor, logvar: Tensor, prior_mean: Tensor, prior_precision: Tensor) -> Tensor:
    r"""``KL(N(μ, e^ℓ) || N(μ_p, 1/λ_p))`` summed over entries, differentiable in ``μ`` and ``ℓ``:
    ``½ Σ [λ_p e^ℓ + λ_p (μ − μ_p)² − 1 − log λ_p − ℓ]`` (the one elementwise Gaussian KL: DiagGaussian.kl and the
    variational layers both use it)."""
    return 0.5 * (prior_precision * (logvar.exp() + (mu - prior_mean) ** 2) - 1.0
                  - torch.log(prior_precision) - logvar).sum()


@torch.no_grad()
def add_diag_gaussian_kl_grad_(mu: Tensor, logvar: Tensor, prior_mean: Tensor, prior_precision: Tensor,
                               scale: float = 1.0, log_precision_sum: Tensor | None = None) -> Tensor:
    r"""Add ``scale · ∇ KL(N(μ, e^ℓ) || N(μ_p, 1/λ_p))`` to ``mu.grad`` and ``logvar.grad`` (zeros where ``None``)
    in closed form, :math:`\nabla_\mu = \lambda_p(\mu - \mu_p)`, :math:`\nabla_\ell = \tfrac12(\lambda_p e^\ell - 1)`,
    and return the KL itself (unscaled; the value of :func:`diag_gaussian_kl`).

    One tensor of :func:`add_diag_gaussian_kl_grads_`. ``log_precision_sum`` is ``Σ log λ_p`` when the caller keeps
    it per prior (it is computed otherwise).
    """
    kl = add_diag_gaussian_kl_grads_([mu], [logvar], [prior_mean], [prior_precision], scale,
                                     None if log_precision_sum is None else [log_precision_sum])
    assert kl is not None
    return kl


@torch.no_grad()
def add_diag_gaussian_kl_grads_(mus: Sequence[Tensor], logvars: Sequence[Tensor], prior_means: Sequence[Tensor],
                                prior_precisions: Sequence[Tensor], scale: float = 1.0,
                                log_precision_sums: Sequence[Tensor] | None = None,
                                value: bool = True) -> Tensor | None:
    r""":func:`add_diag_gaussian_kl_grad_` for lists of tensors at once, fused (``torch._foreach_*``: a few passes
    over memory for all of them, not a few Python calls per tensor); returns the summed KL, or ``None`` with
    ``value=False`` (the gradient alone skips two of the passes).

    Args:
        mus, logvars: the variational parameters ``μ`` and ``ℓ`` (their ``.grad`` is added to; zeros where ``None``).
        prior_means, prior_precisions: ``μ_p`` and ``λ_p`` per tensor (same shapes).
        scale: the factor of the gradient (not of the returned KL).
        log_precision_sums: ``Σ log λ_p`` per tensor when the caller keeps them (computed otherwise).
        value: compute and return the KL.
    """
    for p in (*mus, *logvars):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not mus:
        return torch.zeros(()) if value else None
    mu_d, lv_d = [m.detach() for m in mus], [v.detach() for v in logvars]
    diff, var = torch._foreach_sub(mu_d, list(prior_means)), torch._foreach_exp(lv_d)
    torch._foreach_addcmul_([m.grad for m in mus], list(prior_precisions), diff, value=scale)
    lv_grads = [v.grad for v in logvars]
    torch._foreach_addcmul_(lv_grads, list(prior_precisions), var, value=0.5 * scale)
    torch._foreach_add_(lv_grads, -0.5 * scale)
    if not value:
        return None
    if log_precision_sums is None:
        log_precision_sums = [torch.log(pp).sum() for pp in prior_precisions]
    torch._foreach_addcmul_(var, diff, diff)  # var + diff², in place (var is ours)
    total = torch.zeros((), dtype=mu_d[0].dtype, device=mu_d[0].device)
    for pp, v, lv, lps in zip(prior_precisions, var, lv_d, log_precision_sums):
        total = total + 0.5 * (torch.dot(pp.reshape(-1), v.reshape(-1)) - lv.sum() - lv.numel() - lps)
    return total
