"""A posterior server: a prior times one site per source of data, in natural parameters.

Following Hasenclever et al. (2017), the posterior is held as

    q(θ) ∝ p0(θ) Π_k t_k(θ),        η_q = η_0 + Σ_k λ_k,

where each site ``t_k`` (a task, or a worker × task) is a Gaussian of the prior's kind (usually improper:
zero precision where the task says nothing). Combining, removing (unlearning) a task, damping and the EP cavity
are then additions of natural parameters:

* ``posterior() = p0 · Π_k t_k`` (cached, invalidated by every change);
* ``cavity(k) = posterior / t_k``, computed as ``p0 · Π_{j≠k} t_j`` (the same Gaussian without a subtraction);
* ``update(k, t_new)``: ``t_k ← t_k^(1−δ) · t_new^δ`` with the damping ``δ ∈ (0, 1]``.

>>> import torch
>>> from bayescl.gaussian.diag import DiagGaussian
>>> prior = DiagGaussian.isotropic({"w": torch.zeros(2)}, precision=1.0)
>>> server = PosteriorServer(prior)
>>> server.add("task0", DiagGaussian.from_mean_precision({"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}))
>>> server.posterior().mean["w"]
tensor([0.7500, 0.7500])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bayescl._checks import check_real
from bayescl.gaussian.diag import DiagGaussian, Params, check_same_names
from bayescl.gaussian.kinds import Gaussian, gaussian_from_state_dict
from bayescl.gaussian.kron import KronGaussian


@dataclass(frozen=True, order=True)
class SiteKey:
    """The name of a site as data: the data of ``task`` seen by ``worker``.

    Args:
        task: the task index (``>= 0``).
        worker: the worker (rank) index, or ``None`` for the whole task (every worker's data in one site).
        others: ``True`` for the running sum of the task's sites of every worker *but* ``worker`` (what a
            worker of :class:`~bayescl.lightning.strategy.PosteriorServerStrategy` learns from the all-reduce
            during a fit; replaced by the gathered worker sites when the task ends).

    ``str(key)`` is ``"task-3"``, ``"task-3/worker-1"`` or ``"task-3/others-of-1"``.
    """

    task: int
    worker: int | None = None
    others: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.task, bool) or not isinstance(self.task, int) or self.task < 0:
            raise ValueError(f"task must be an int >= 0, got {self.task!r}.")
        if self.worker is not None and (isinstance(self.worker, bool) or not isinstance(self.worker, int)
                                        or self.worker < 0):
            raise ValueError(f"worker must be None or an int >= 0, got {self.worker!r}.")
        if self.others and self.worker is None:
            raise ValueError("others=True needs the worker whose share is left out; got worker=None.")

    def __str__(self) -> str:
        if self.worker is None:
            return f"task-{self.task}"
        return f"task-{self.task}/{'others-of' if self.others else 'worker'}-{self.worker}"


#: a site's name: a plain string or a :class:`SiteKey`
Key = str | SiteKey


def laplace_site(cavity: Gaussian, curvature: Gaussian, mean: Params) -> Gaussian:
    r"""The site :math:`t = q / q_{\text{cav}}` of the Laplace posterior
    :math:`q = \mathcal N(\text{mean}, (\Lambda_{\text{cav}} + \Lambda_{\text{curv}})^{-1})`: precision
    :math:`\Lambda_{\text{curv}}` and :math:`\eta = (\Lambda_{\text{cav}} + \Lambda_{\text{curv}})\,\text{mean}
    - \eta_{\text{cav}}`, so ``cavity * site`` is centred exactly on ``mean`` (the optimum that was found).
    Used by the online Laplace callback (cavity = the previous posterior) and the distributed strategy
    (cavity = the posterior without this worker's site)."""
    return (cavity * curvature).with_mean(mean).divide(cavity, allow_improper=True)


class PosteriorServer:
    """A prior and an ordered set of named sites of the same Gaussian kind.

    Args:
        prior: a proper :class:`DiagGaussian` or :class:`KronGaussian`.
        damping: ``δ ∈ (0, 1]`` used by :meth:`update` (1: the new site replaces the old one).
    """

    def __init__(self, prior: Gaussian, damping: float = 1.0) -> None:
        if not isinstance(prior, (DiagGaussian, KronGaussian)):
            raise TypeError(f"prior must be a DiagGaussian or KronGaussian, got {type(prior).__name__}.")
        self._prior = prior
        self._sites: dict[Key, Gaussian] = {}
        self.damping = damping
        self._cache: Gaussian | None = None

    # ------------------------------------------------------------------ properties
    @property
    def prior(self) -> Gaussian:
        return self._prior

    @property
    def damping(self) -> float:
        return self._damping

    @damping.setter
    def damping(self, value: float) -> None:
        self._damping = check_real(value, "damping", low=0.0, high=1.0, low_open=True)

    @property
    def names(self) -> tuple[Key, ...]:
        return tuple(self._sites)

    def tasks(self) -> tuple[int, ...]:
        """The sorted task indices of the :class:`SiteKey` sites (string names carry no task)."""
        return tuple(sorted({k.task for k in self._sites if isinstance(k, SiteKey)}))

    def __iter__(self) -> Iterator[Key]:
        return iter(tuple(self._sites))

    def items(self) -> list[tuple[Key, Gaussian]]:
        return list(self._sites.items())

    def __len__(self) -> int:
        return len(self._sites)

    def __contains__(self, name: object) -> bool:
        return name in self._sites

    def __getitem__(self, name: Key) -> Gaussian:
        return self._sites[self._known(name)]

    def __repr__(self) -> str:
        return (f"PosteriorServer({type(self._prior).__name__}, sites={[str(k) for k in self._sites]}, "
                f"damping={self._damping})")

    # ------------------------------------------------------------------ sites
    def _known(self, name: Key) -> Key:
        if name not in self._sites:
            raise KeyError(f"site {str(name)!r} is unknown; known sites: {[str(k) for k in self._sites]}.")
        return name

    def _check_site(self, name: Key, site: object) -> Gaussian:
        if not isinstance(name, (str, SiteKey)):
            raise TypeError(f"site name must be a str or a SiteKey, got {type(name).__name__} {name!r}.")
        if type(site) is not type(self._prior):
            raise TypeError(f"site {str(name)!r} must be a {type(self._prior).__name__} like the prior, "
                            f"got {type(site).__name__}.")
        check_same_names(self._prior.eta, site.eta, f"site {str(name)!r}")
        return site

    def add(self, name: Key, site: Gaussian) -> None:
        """Add a new site; ``KeyError`` if ``name`` exists or another site's name has the same ``str``
        (``"task-0"`` and ``SiteKey(0)``: their ``state_dict`` entries would collide)."""
        if name in self._sites:
            raise KeyError(f"site {str(name)!r} exists already; use replace() or update().")
        clash = [k for k in self._sites if str(k) == str(name)]
        if clash:
            raise KeyError(f"site name {name!r} prints as {str(name)!r} like the existing site {clash[0]!r}; "
                           "use another name.")
        self._sites[name] = self._check_site(name, site)
        self._cache = None

    def replace(self, name: Key, site: Gaussian) -> None:
        """Replace an existing site (``KeyError`` naming an unknown site)."""
        self._known(name)
        self._sites[name] = self._check_site(name, site)
        self._cache = None

    def remove(self, name: Key) -> Gaussian:
        """Remove and return a site: the posterior forgets (unlearns) that source of data.

        Raises ``ValueError`` (and keeps the site) if another site is signed (has negative precision, as VCL's
        ``q_t / q_{t−1}`` may) and the posterior without ``name`` would have precision ``<= 0`` somewhere.
        """
        self._known(name)
        if any(getattr(s, "is_signed", False) for n, s in self._sites.items() if n != name) \
                and isinstance(self._prior, DiagGaussian) and self._prior.is_proper():
            rest = self._product(skip=name)
            for param, p in rest.precision.items():
                if bool((p <= 0).any()):
                    raise ValueError(
                        f"cannot remove site {str(name)!r}: without it the posterior's precision of parameter {param!r} "
                        f"is <= 0 on {int((p <= 0).sum())} entries, because a later site has negative precision "
                        "(a variational posterior wider than its prior). The site is kept.")
        site = self._sites.pop(name)
        self._cache = None
        return site

    def update(self, name: Key, new_site: Gaussian, damping: float | None = None) -> Gaussian:
        r"""Damped update :math:`t \leftarrow t^{1-\delta}\, t_{new}^{\delta}` (natural parameters interpolated,
        :math:`\lambda \leftarrow (1-\delta)\lambda + \delta\lambda_{new}`); returns the new site.

        Args:
            name: the site; an unknown one starts from the empty site, i.e. it is added as ``t_new^δ``.
            new_site: the undamped new site.
            damping: ``δ ∈ (0, 1]`` for this update; ``None`` uses :attr:`damping`.
        """
        self._check_site(name, new_site)
        d = self._damping if damping is None else check_real(damping, "damping", low=0.0, high=1.0, low_open=True)
        site = new_site.temper(d) if name not in self._sites or d == 1.0 else \
            self._sites[name].temper(1.0 - d) * new_site.temper(d)
        self._sites[name] = site
        self._cache = None
        return site

    # ------------------------------------------------------------------ posterior
    def _product(self, skip: Key | None = None, keep: Any = None) -> Gaussian:
        q = self._prior
        for n, site in self._sites.items():
            if n != skip and (keep is None or keep(n)):
                q = q * site
        return q

    def posterior(self) -> Gaussian:
        """``p0 · Π_k t_k`` (cached until the next change)."""
        if self._cache is None:
            self._cache = self._product()
        return self._cache

    def cavity(self, name: Key, *, floor: bool = False) -> Gaussian:
        r"""``posterior / t_name``, computed exactly as :math:`p_0 \prod_{k \ne name} t_k`.

        Args:
            name: the site left out.
            floor: (diagonal only) clamp the cavity's precision below at that of the prior of ``name``'s task,
                :math:`\Lambda_{-k} \leftarrow \max(\Lambda_{-k},\ \Lambda_0 + \sum_{j:\ task(j) \ne task(k)}
                \Lambda_j)` (elementwise, ``η`` kept; sites named by a
                string count as other tasks, and for a string ``name`` the clamp is a no-op). When the sites of one task have precision ``>= 0`` this changes nothing in exact
                arithmetic; it removes float rounding where a site is accumulated as a difference (a worker's
                :class:`SiteKey` ``others`` site is an all-reduce sum minus its own change, so an exact 0 may
                come back as ±1 ulp of the sum, and a cavity below the task's prior, even negative).

        Raises:
            KeyError: ``name`` is unknown.
            TypeError: ``floor=True`` with a Kronecker-factored prior.
        """
        q = self._product(skip=self._known(name))
        if not floor:
            return q
        if not isinstance(q, DiagGaussian):
            raise TypeError(f"floor=True needs DiagGaussian sites, this server holds {type(q).__name__}.")
        task = name.task if isinstance(name, SiteKey) else None
        base = self._product(keep=lambda k: k != name and (task is None or not isinstance(k, SiteKey)
                                                            or k.task != task))
        return DiagGaussian(q.eta, {n: torch.maximum(p, base.precision[n]) for n, p in q.precision.items()},
                            signed=True)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Move the prior and every site to ``device`` / ``dtype``, in place (a module moved or cast after the
        server was built, e.g. by Lightning's ``precision="64-true"``)."""
        self._prior = self._prior.to(device=device, dtype=dtype)
        self._sites = {k: site.to(device=device, dtype=dtype) for k, site in self._sites.items()}
        self._cache = None

    def extend_prior(self, params: Params, precision: float) -> None:
        """Add parameters not seen so far (heads that appear later): base prior ``precision`` in the prior and
        zero-precision entries in every site; the prior's mean there is the given tensors."""
        self._prior = self._prior.extend(params, precision)
        self._sites = {n: s.extend(params, 0.0) for n, s in self._sites.items()}
        self._cache = None

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """``{"prior": ..., "sites": {str(name): ...} (ordered), "damping": δ}``, plus ``"keys": {str(key):
        (task, worker, others)}`` for the :class:`SiteKey` names (plain tuples: loadable with
        ``torch.load(weights_only=True)``)."""
        out = {"prior": self._prior.state_dict(), "sites": {str(n): s.state_dict() for n, s in self._sites.items()},
               "damping": self._damping}
        keys = {str(k): (k.task, k.worker, k.others) for k in self._sites if isinstance(k, SiteKey)}
        if keys:
            out["keys"] = keys
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load in place; the prior's parameters must match (``ValueError`` naming the first that differs)."""
        for key in ("prior", "sites", "damping"):
            if key not in state:
                raise KeyError(f"state lacks {key!r}; expected keys 'prior', 'sites', 'damping'.")
        prior = gaussian_from_state_dict(state["prior"])
        if type(prior) is not type(self._prior):
            raise ValueError(f"state holds a {type(prior).__name__} prior but this server has a "
                             f"{type(self._prior).__name__}; kinds must match.")
        check_same_names(self._prior.eta, prior.eta, "state prior")
        keys = state.get("keys", {})
        sites = {(SiteKey(*keys[n]) if n in keys else n): gaussian_from_state_dict(sd)
                 for n, sd in state["sites"].items()}
        self._prior, self._sites, self._cache = prior, {}, None
        self.damping = state["damping"]
        for n, s in sites.items():
            self.add(n, s)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PosteriorServer:
        server = cls(gaussian_from_state_dict(state["prior"]), damping=state["damping"])
        server.load_state_dict(state)
        return server
