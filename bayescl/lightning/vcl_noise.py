"""Reproducible noise for :class:`~bayescl.lightning.vcl.VCLCallback`'s variational layers.

Every batch seeds one generator (per device) from the callback's ``seed`` and a key that names the batch
(``(0, task, epoch, batch)`` in training, ``(1, dataloader, batch)`` in evaluation, ``(2, task)`` for the coreset
fine-tune): the same step draws the same noise, also after a resume from a checkpoint.

>>> mix(0, 1) == mix(0, 1) != mix(1, 0)
True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bayescl.methods.variational import BayesLayer


def mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers (FNV-1a over their 64-bit values)."""
    h = 0xCBF29CE484222325
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def seed_layers(layers: Mapping[str, BayesLayer], generators: dict[torch.device, torch.Generator],
                seed: int, *key: int) -> None:
    """Give every layer of ``layers`` one generator seeded from ``(seed, *key)``.

    Args:
        layers: the variational layers, by module path (nothing happens if empty).
        generators: one generator per device, created on first use and kept by the caller.
        seed: the callback's seed.
        key: integers naming the batch.
    """
    if not layers:
        return
    device = next(iter(layers.values())).weight_mu.device
    g = generators.get(device)
    if g is None:
        g = generators[device] = torch.Generator(device=device)
    g.manual_seed(mix(seed, *key))
    for layer in layers.values():
        layer.generator = g
