"""A different ``lam`` per layer for the Kronecker weight prior (an experiment, not a feature).

Runs ``bayescl <args>`` (e.g. ``tune``) with ``LaplaceCallback.curvature_site`` patched so that each layer's
Kronecker curvature site is multiplied by its own factor before ``lam`` and the online posterior see it. The
factors come from ``--layer-scale PREFIX=FACTOR,...`` (layers and parameters whose name starts with ``PREFIX``;
others keep 1). It reaches into ``KronGaussian``'s fields, which is why it is a diagnostic and not an option of the
callback. The question it answered (docs/defaults.md, "What else was tried on permuted MNIST"): does the
permutation-specific first layer want room and the layers above a firmer hold? The runs, validation only:

    python benchmarks/diagnostics/layer_lam.py --layer-scale model.trunk.1=0.333 -- tune --strategy fromp-200 \\
        --grid weight_prior=true --grid structure=kron --grid fisher=mc --grid online=true --grid lam=3 \\
        --grid selection=hessian --grid tau=10 --grid points_per_step=256 --scenario permuted-mnist \\
        --tune-tasks 10 --epochs 3 --seeds 1 --no-uncertainty --no-final \\
        --out benchmarks/results/function-space-tuned --name fromp-200-kron-layer-first0.33

and the same with ``--layer-scale model.trunk.3=3.333,model.head=3.333 ... --name fromp-200-kron-layer-upper3.33``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from bayescl.gaussian.kron import KronGaussian
from bayescl.harness.cli import main as bayescl_main
from bayescl.lightning.laplace import LaplaceCallback


def scaled_per_layer(site: KronGaussian, factors: dict[str, float]) -> KronGaussian:
    """``site`` with each layer's block (its Kronecker terms, diagonal and natural mean) times its factor; the mean
    of every block is unchanged."""
    def fac(name: str) -> float:
        return next((v for k, v in factors.items() if name.startswith(k)), 1.0)

    terms = {layer: {tag: replace(t, scale=fac(layer) * t.scale) for tag, t in ts.items()}
             for layer, ts in site._terms.items()}
    return KronGaussian._trusted({n: fac(n) * v for n, v in site._eta.items()}, dict(site._layers), terms,
                                 {n: fac(n) * d for n, d in site._diag.items()}, site._mean)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer-scale", required=True, metavar="PREFIX=FACTOR,...")
    ap.add_argument("bayescl_args", nargs=argparse.REMAINDER, help="after --: the bayescl command to run")
    args = ap.parse_args(argv)
    factors = {k: float(v) for k, v in (item.split("=") for item in args.layer_scale.split(","))}
    original = LaplaceCallback.curvature_site

    def patched(self, *a, **kw):
        site = original(self, *a, **kw)
        if not isinstance(site, KronGaussian):
            raise TypeError("--layer-scale needs structure='kron'.")
        return scaled_per_layer(site, factors)

    LaplaceCallback.curvature_site = patched
    rest = args.bayescl_args[1:] if args.bayescl_args[:1] == ["--"] else args.bayescl_args
    return bayescl_main(rest)


if __name__ == "__main__":
    sys.exit(main())
