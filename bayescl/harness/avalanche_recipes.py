"""Recipes that name an Avalanche strategy (``strategies/avalanche-*.yaml``): the Lightning harness refuses them.

Such a recipe has an ``avalanche: {class_path, init_args}`` entry (an Avalanche strategy class such as
``avalanche.training.EWC``) and no Lightning callbacks. The harness trains a LightningModule with callbacks only, so
running it there would train plain fine-tuning and label the result with the Avalanche method's name.
``benchmarks/avalanche_compare.py --recipes <name>`` runs these recipes with Avalanche itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bayescl.harness.recipes import Recipe, available_recipes, load_recipe

__all__ = ["avalanche_spec", "check_harness_recipe"]

#: the script that runs ``avalanche:`` recipes with Avalanche's own strategies
RUNNER = "benchmarks/avalanche_compare.py"


def avalanche_spec(recipe: Recipe) -> dict[str, Any] | None:
    """The recipe's ``avalanche:`` entry (an Avalanche strategy's ``class_path`` / ``init_args``), or ``None``.

    Args:
        recipe: a recipe from :func:`~bayescl.harness.recipes.load_recipe`.

    Returns:
        The entry as written in the recipe file, or ``None`` when the recipe has none.
    """
    spec = getattr(recipe, "avalanche", None)  # a Recipe that carries the entry itself
    if not spec and recipe.path is not None and Path(recipe.path).suffix in (".yaml", ".yml"):
        doc = yaml.safe_load(Path(recipe.path).read_text()) or {}
        spec = doc.get("avalanche") if isinstance(doc, dict) else None
    return spec or None


def _harness_recipes() -> list[str]:
    """Names of the recipes the harness runs (those without an ``avalanche:`` entry)."""
    names = []
    for name in available_recipes():
        try:
            if avalanche_spec(load_recipe(name)) is None:
                names.append(name)
        except ValueError:  # a malformed recipe is reported when it is run, not here
            continue
    return names


def check_harness_recipe(recipe: Recipe) -> None:
    """Refuse a recipe that names an Avalanche strategy, before any training.

    Args:
        recipe: the recipe the harness is about to run.

    Raises:
        ValueError: the recipe has an ``avalanche:`` entry; the message names the strategy class, the script that
            runs it and the recipes the harness runs.
    """
    spec = avalanche_spec(recipe)
    if not spec:
        return
    cls = spec.get("class_path", "?") if isinstance(spec, dict) else "?"
    raise ValueError(
        f"strategy={recipe.name!r} is an Avalanche recipe ({cls}); the Lightning harness cannot run Avalanche "
        f"strategies (it would train plain fine-tuning under that name). Run it with "
        f"`python {RUNNER} --recipes {recipe.name}`, or choose a harness recipe: {', '.join(_harness_recipes())}."
    )
