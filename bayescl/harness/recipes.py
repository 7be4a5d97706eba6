"""Named continual-learning recipes: one YAML file per strategy under ``strategies/``.

A recipe is what LightningCLI users already read, ``class_path`` / ``init_args``::

    name: laplace-kron
    description: Online Kronecker-factored Laplace (Ritter et al. 2018).
    callbacks:
      - class_path: bayescl.LaplaceCallback
        init_args: {structure: kron}
    trainer: {}            # extra pl.Trainer arguments
    data: {cumulative: false}   # true: train on every task seen so far (the joint upper bound)

Recipes are looked up by name in ``$BAYESCL_STRATEGIES``, then ``./strategies``, then the ``strategies/`` folder
beside the installed package; a path to a ``.yaml`` file works too.

A *grid* file (``benchmarks/grids/*.yaml``) lists variants of base recipes; ``GRID.yaml#VARIANT`` names one::

    base: vcl                      # the recipe every variant starts from (a variant may name its own ``base``)
    variants:
      vcl-lv7:                     # the variant's recipe name (and its result file's name)
        init_args: {logvar_init: -7.0, train_samples: 1}   # merged into the base's first callback
        description: ...           # optional; also ``data`` / ``trainer`` / ``module`` (merged) and ``base``
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: ``avalanche`` describes a baseline run through Avalanche itself (benchmarks/avalanche_compare.py), not the harness.
ALLOWED_KEYS = {"name", "description", "callbacks", "trainer", "data", "module", "avalanche"}


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.2; PyYAML's 1.1 rules want ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def recipe_dirs() -> list[Path]:
    dirs = []
    if env := os.environ.get("BAYESCL_STRATEGIES"):
        dirs.append(Path(env))
    dirs += [Path.cwd() / "strategies", Path(__file__).resolve().parent.parent / "strategies"]
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.append(d.resolve())
    return seen


def available_recipes() -> list[str]:
    """Names of the recipes found in :func:`recipe_dirs`."""
    return sorted({p.stem for d in recipe_dirs() for p in d.glob("*.yaml")})


def instantiate(spec: dict[str, Any], where: str = "spec") -> Any:
    """Build ``class_path(**init_args)`` from a LightningCLI-style dict."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{where} must be a mapping with 'class_path' (and optional 'init_args'); got {spec!r}.")
    extra = set(spec) - {"class_path", "init_args"}
    if extra:
        raise ValueError(f"{where} has unknown keys {sorted(extra)}; allowed: 'class_path', 'init_args'.")
    module_name, _, attr = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"{where}: class_path {spec['class_path']!r} cannot be imported ({exc}).") from exc
    return cls(**(spec.get("init_args") or {}))


@dataclass
class Recipe:
    """A parsed recipe; :meth:`build_callbacks` gives fresh callback instances each call."""

    name: str
    description: str = ""
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    trainer: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    module: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    #: an Avalanche strategy's ``{class_path, init_args}`` (a baseline the harness does not run), or ``None``
    avalanche: dict[str, Any] | None = None

    @property
    def cumulative(self) -> bool:
        return bool(self.data.get("cumulative", False))

    def build_callbacks(self) -> list[Any]:
        return [instantiate(spec, f"recipe {self.name!r} callbacks[{i}]") for i, spec in enumerate(self.callbacks)]


GRID_KEYS = {"base", "variants"}
VARIANT_KEYS = {"base", "description", "init_args", "data", "trainer", "module"}


def grid_variants(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The variants of a grid file, by name (see the module docstring for the format)."""
    doc = yaml.load(Path(path).read_text(), Loader=_Loader) or {}
    if not isinstance(doc, dict) or set(doc) - GRID_KEYS or not isinstance(doc.get("variants"), dict):
        raise ValueError(f"grid {path} must be a mapping with 'variants' (a mapping) and an optional 'base'.")
    variants = {}
    for name, v in doc["variants"].items():
        v = dict(v or {})
        if unknown := set(v) - VARIANT_KEYS:
            raise ValueError(f"grid {path}: variant {name!r} has unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(VARIANT_KEYS)}.")
        v.setdefault("base", doc.get("base"))
        if not v["base"]:
            raise ValueError(f"grid {path}: variant {name!r} has no 'base' recipe (and the grid none).")
        variants[str(name)] = v
    return variants


def load_variant(grid: str | os.PathLike[str], variant: str) -> Recipe:
    """The recipe ``variant`` of the grid file ``grid``: its base recipe with the variant's overrides."""
    variants = grid_variants(grid)
    if variant not in variants:
        raise ValueError(f"variant={variant!r} is not in grid {grid}; allowed: {', '.join(variants)}.")
    v = variants[variant]
    base = load_recipe(v["base"])
    callbacks = [dict(spec) for spec in base.callbacks]
    if v.get("init_args"):
        if not callbacks:
            raise ValueError(f"grid {grid}: variant {variant!r} sets init_args but recipe {v['base']!r} has no "
                             "callback.")
        callbacks[0]["init_args"] = {**(callbacks[0].get("init_args") or {}), **v["init_args"]}
    return Recipe(name=variant, description=v.get("description") or base.description, callbacks=callbacks,
                  trainer={**base.trainer, **(v.get("trainer") or {})}, data={**base.data, **(v.get("data") or {})},
                  module={**base.module, **(v.get("module") or {})}, path=Path(grid), avalanche=base.avalanche)


def load_recipe(name_or_path: str | os.PathLike[str]) -> Recipe:
    """Load a recipe by name (``"naive"``), path (``"strategies/naive.yaml"``) or grid variant
    (``"benchmarks/grids/vcl.yaml#vcl-lv7"``).

    Raises:
        ValueError: unknown name (the message lists the recipes found) or a malformed file.
    """
    grid, sep, variant = str(name_or_path).partition("#")
    if sep:
        return load_variant(grid, variant)
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        candidates = [d / f"{name_or_path}.yaml" for d in recipe_dirs()]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ValueError(
                f"strategy={str(name_or_path)!r} is not a known recipe; allowed: "
                f"{', '.join(available_recipes()) or '(none found)'} or a path to a .yaml file."
            )
        path = found[0]
    doc = yaml.load(path.read_text(), Loader=_Loader) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping, got {type(doc).__name__}.")  # noqa: TRY004
    unknown = set(doc) - ALLOWED_KEYS
    if unknown:
        raise ValueError(f"recipe {path} has unknown keys {sorted(unknown)}; allowed: {sorted(ALLOWED_KEYS)}.")
    for key, typ in (("callbacks", list), ("trainer", dict), ("data", dict), ("module", dict)):
        if doc.get(key) is not None and not isinstance(doc[key], typ):
            raise ValueError(f"recipe {path}: {key!r} must be a {typ.__name__}, got {type(doc[key]).__name__}.")
    return Recipe(
        name=doc.get("name", path.stem),
        description=doc.get("description", ""),
        callbacks=doc.get("callbacks") or [],
        trainer=doc.get("trainer") or {},
        data=doc.get("data") or {},
        module=doc.get("module") or {},
        avalanche=doc.get("avalanche"),
        path=path,
    )
