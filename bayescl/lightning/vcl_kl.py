r"""The KL term of :class:`~bayescl.lightning.vcl.VCLCallback`, added to the gradients.

For task :math:`t` with :math:`N_t` examples the per-example objective is
:math:`\mathbb E_q[\ell(\theta)] + \frac{1}{N_t}\mathrm{KL}(q\,\|\,q_{t-1})`. The first term is the user's loss; the
second is added in ``on_before_optimizer_step`` through its closed-form gradient per weight (mean-field
:math:`q = \mathcal N(\mu, e^{\ell})`, prior :math:`\mathcal N(\mu_p, \lambda_p^{-1})`):

.. math::  \nabla_\mu = \lambda_p(\mu-\mu_p), \qquad \nabla_\ell = \tfrac12(\lambda_p e^{\ell} - 1),

divided by :math:`N_t` (:func:`~bayescl.gaussian.diag.add_diag_gaussian_kl_grad_`). Only layers with a data gradient
in the step get it, so a layer no task has used keeps its initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bayescl.gaussian.diag import DiagGaussian, diag_gaussian_kl
from bayescl.gaussian.diag_kl import add_diag_gaussian_kl_grads_
from bayescl.methods.variational import BayesLayer


def layer_names(path: str, layer: BayesLayer) -> list[str]:
    """The logical parameter names (``<path>.weight``, ``<path>.bias``) of the variational layer at ``path``."""
    return [f"{path}.{k}" if path else k for k, _, _ in layer.variational_params()]


def has_data_grad(layer: BayesLayer) -> bool:
    """Whether some variational parameter of ``layer`` has a non-zero ``.grad`` (the data used the layer).

    The bias gradients are looked at first: small, and non-zero whenever the layer was used by a loss that depends
    on its output, so a used layer costs one small comparison; the weights only when they are all zero.
    """
    pairs = list(layer.variational_params())
    for _, mu, lv in reversed(pairs):
        for p in (mu, lv):
            if p.grad is not None and bool(p.grad.ne(0).any()):
                return True
    return False


class KLTermMixin:
    """The KL half of :class:`~bayescl.lightning.vcl.VCLCallback` (uses its ``layers``, ``posterior``,
    ``ensure_server``, ``prior_term_scale``, ``ml_init``, ``ml_epochs``, ``tasks_seen`` and ``_touched``)."""

    _grad_cache: object
    _touched: set[str]

    def _prior_tensors(self, ref: Tensor, prior: DiagGaussian | None = None) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """``name -> (mean, precision, Σ log precision)`` of ``prior`` (default: the posterior) on ``ref``'s device
        and dtype, cached for the last Gaussian asked for."""
        q = self.posterior() if prior is None else prior
        if self._grad_cache is None or self._grad_cache[0] is not q:
            mean, prec = q.mean, q.precision
            self._grad_cache = (q, {n: (mean[n].to(ref), prec[n].to(ref), torch.log(prec[n].to(ref)).sum())
                                    for n in q.names})
        return self._grad_cache[1]

    def kl(self, pl_module: nn.Module, paths: Sequence[str] | None = None,
           prior: DiagGaussian | None = None) -> Tensor:
        """``KL(q || prior)`` over the given layers (default: all), differentiable; prior default: the posterior."""
        layers = self.layers(pl_module)
        paths = list(layers) if paths is None else list(paths)
        ref = next(iter(layers.values())).weight_mu
        tensors = self._prior_tensors(ref, prior)
        total = torch.zeros((), dtype=ref.dtype, device=ref.device)
        for path in paths:
            layer = layers[path]
            for name, (_, mu, lv) in zip(layer_names(path, layer), layer.variational_params()):
                pm, pp, _ = tensors[name]
                total = total + diag_gaussian_kl(mu, lv, pm, pp)
        return total

    def _add_kl_grad(self, pl_module: nn.Module, scale: float, prior: DiagGaussian | None = None,
                     touched: set[str] | None = None, only: set[int] | None = None,
                     value: bool = True) -> Tensor | None:
        """Add ``scale · ∇KL`` to the .grad of the layers that got a data gradient; returns the KL (detached), or
        ``None`` with ``value=False`` (or when no layer got a data gradient).

        Raises:
            ValueError: (with ``value``) the KL is not finite (names the non-finite variational parameters).
        """
        layers = self.layers(pl_module)
        paths = [p for p, layer in layers.items()
                 if has_data_grad(layer) and (only is None or id(layer.weight_mu) in only)]
        if touched is not None:
            for p in paths:
                touched.update(layer_names(p, layers[p]))
        if not paths:
            return None
        tensors = self._prior_tensors(next(iter(layers.values())).weight_mu, prior)
        names, mus, lvs = [], [], []
        for p in paths:
            for name, (_, mu, lv) in zip(layer_names(p, layers[p]), layers[p].variational_params()):
                names.append(name)
                mus.append(mu)
                lvs.append(lv)
        pm, pp, log_pp = zip(*(tensors[n] for n in names))
        kl = add_diag_gaussian_kl_grads_(mus, lvs, pm, pp, scale, log_pp, value=value)
        if kl is not None and not bool(torch.isfinite(kl)):
            bad = [n for n, mu, lv in zip(names, mus, lvs)
                   if not (bool(torch.isfinite(mu).all()) and bool(torch.isfinite(lv).all()))]
            raise ValueError(f"the VCL KL term is not finite ({float(kl)}); non-finite variational parameters: "
                             f"{bad or 'none (overflow in exp(logvar))'}. The posterior of the last finished "
                             "task is kept (callback.posterior(); apply_posterior() loads it into the layers).")
        return kl

    @torch.no_grad()
    def add_prior_grad(self, pl_module: nn.Module, epoch: int | None = None,
                       only: set[int] | None = None, value: bool = True) -> Tensor | None:
        """``.grad += ∇KL(q || q_{t−1}) / N_t`` on the layers with a data gradient (the documented mechanism).

        Args:
            pl_module: the model.
            epoch: the epoch within the task (``None``: not in the maximum-likelihood phase, see :meth:`in_ml_phase`).
            only: ``id`` of the parameters the optimizer about to step holds (``None``: all); a layer is included
                when its weight mean is among them, so with several optimizers each layer gets its term once.
            value: compute the KL's value too (and check that it is finite); ``False``: the gradient alone, cheaper.

        Returns:
            The KL (detached), or ``None`` when no layer got a data gradient, in the maximum-likelihood phase, or
            with ``value=False``.

        Raises:
            ValueError: (with ``value``) the KL is not finite; the posterior of the last finished task is kept.
        """
        self.ensure_server(pl_module)
        if epoch is not None and self.in_ml_phase(epoch):
            for path, layer in self.layers(pl_module).items():
                if has_data_grad(layer):
                    self._touched.update(layer_names(path, layer))
            return None
        return self._add_kl_grad(pl_module, self.prior_term_scale(), touched=self._touched, only=only, value=value)

    def in_ml_phase(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` of the current task is a maximum-likelihood epoch (``ml_init``: the first
        ``ml_epochs`` epochs of the first task train the means deterministically, without the KL)."""
        return self.ml_init and self.tasks_seen == 0 and epoch < self.ml_epochs
