r"""The one elementwise Gaussian KL and its closed-form gradient, shared by :meth:`DiagGaussian.kl
<bayescl.gaussian.diag.DiagGaussian.kl>`, the mean-field variational layers and the VCL callback.

For :math:`q = \mathcal N(\mu, e^{\ell})` and :math:`p = \mathcal N(\mu_p, 1/\lambda_p)` elementwise,

.. math::

    \mathrm{KL}(q \,\|\, p) = \tfrac12 \textstyle\sum \big[\lambda_p e^{\ell} + \lambda_p (\mu - \mu_p)^2 - 1
    - \log \lambda_p - \ell\big],\qquad
    \nabla_\mu = \lambda_p (\mu - \mu_p),\quad \nabla_\ell = \tfrac12 (\lambda_p e^{\ell} - 1).
"""

from __future__ import annotations

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

    Fewer passes over the weights than autograd through :func:`diag_gaussian_kl`. ``log_precision_sum`` is
    ``Σ log λ_p`` when the caller keeps it per prior (it is computed otherwise).
    """
    for p in (mu, logvar):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    diff, var = mu - prior_mean, logvar.exp()
    mu.grad.addcmul_(prior_precision, diff, value=scale)
    logvar.grad.addcmul_(prior_precision, var, value=0.5 * scale).sub_(0.5 * scale)
    if log_precision_sum is None:
        log_precision_sum = torch.log(prior_precision).sum()
    quad = torch.dot(prior_precision.reshape(-1), (var + diff * diff).reshape(-1))
    return 0.5 * (quad - logvar.sum() - mu.numel() - log_precision_sum)
