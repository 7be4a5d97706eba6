"""Published and peer accuracies that ``bayescl report`` prints beside this repository's results.

Sources and protocols as in docs/design.md ("Published numbers"); peers were measured on a 2-core CPU machine with
the same data files, pixels in [0, 1] and Adam 1e-3.
"""

from __future__ import annotations

from typing import Any

_NGUYEN = "Nguyen et al. 2018 (VCL, ICLR)"
_HSU = "Hsu et al. 2018 (Re-evaluating continual learning scenarios)"
_AVA = "Avalanche reproduced baselines (continual-learning-baselines)"
_PEER = "peer measured on this machine (docs/design.md)"
_VCL_SPLIT = "multi-head MLP 2x256, 120 epochs, full batch, Adam 1e-3"
_VCL_PERM = "single head MLP 2x100, 100 epochs, batch 256, coreset 200/task"
_HSU_P = "MLP 2x400, Adam 1e-3, batch 128"
_PEER_SPLIT = "multi-head 2x256, 5 epochs, batch 64, Adam 1e-3"
_PEER_PERM = "10 tasks, 2x100, 3 epochs, batch 256, Adam 1e-3"
_PEER_DOM = "one 2-way head, 2x256, 5 epochs, batch 64, Adam 1e-3"
_PEER_TUNED = "peer measured on this machine (benchmarks/results/avalanche-validated)"
_TUNED = "; λ chosen on validation (10 % of every experience held out, 3 tuning seeds), test mean of 3 seeds"


def _p(method: str, acc: float | None, source: str, protocol: str, wall: float | None = None,
       approx: bool = False) -> dict[str, Any]:
    return {"method": method, "accuracy": acc, "source": source, "protocol": protocol, "wall_seconds": wall,
            "approx": approx}


#: Published and peer accuracies (%, average over tasks after the last one) per scenario, with their sources and
#: protocols (see docs/design.md, "Published numbers"). ``wall_seconds`` only for peers measured here; ``approx``: the
#: paper gives the number only approximately (read off a figure).
PUBLISHED: dict[str, list[dict[str, Any]]] = {
    "split-mnist-task": [
        _p("VCL", 97.0, _NGUYEN, _VCL_SPLIT),
        _p("VCL + coreset (40/task)", 98.4, _NGUYEN, _VCL_SPLIT),
        _p("EWC", 63.1, _NGUYEN, _VCL_SPLIT),
        _p("SI", 98.9, _NGUYEN, _VCL_SPLIT),
        _p("LP (Laplace propagation)", 61.2, _NGUYEN, _VCL_SPLIT),
        _p("online EWC", 98.04, _HSU, _HSU_P),
        _p("SI", 98.56, _HSU, _HSU_P),
        _p("offline (joint)", 99.52, _HSU, _HSU_P),
        _p("SI", 97.0, _AVA, "Avalanche's split-MNIST task-IL protocol"),
        _p("Avalanche Naive", 94.83, _PEER, _PEER_SPLIT, 19.0),
        _p("Avalanche EWC λ=1e4 (best of λ scored on test)", 99.23, _PEER, _PEER_SPLIT, 28.8),
        _p("Avalanche SI λ=1 (a no-op on CPU in Avalanche 0.6)", 95.01, _PEER, _PEER_SPLIT, 31.4),
        _p("Avalanche EWC, validated λ=1e5", 98.92, _PEER_TUNED, _PEER_SPLIT + _TUNED),
        _p("Avalanche SI, CPU no-op patched, validated λ=1e6", 96.55, _PEER_TUNED, _PEER_SPLIT + _TUNED),
    ],
    "split-mnist-domain": [
        _p("online EWC", 57.33, _HSU, _HSU_P),
        _p("SI", 64.76, _HSU, _HSU_P),
        _p("offline (joint)", 98.59, _HSU, _HSU_P),
        _p("Avalanche Naive", 58.96, _PEER, _PEER_DOM, 11.4),
        _p("Avalanche EWC λ=1e3", 62.28, _PEER, _PEER_DOM, 16.9),
        _p("Avalanche EWC λ=1e4", 63.77, _PEER, _PEER_DOM, 17.8),
        _p("Avalanche EWC λ=1e5 (best of λ scored on test)", 65.34, _PEER, _PEER_DOM, 18.7),
        _p("Avalanche EWC, validated λ=1e7", 64.35, _PEER_TUNED, _PEER_DOM + _TUNED),
        _p("plain loop, naive", 55.04, _PEER, _PEER_DOM, 6.6),
        _p("laplace-torch online KFAC", 63.60, _PEER, _PEER_DOM, 53.9),
    ],
    "split-mnist-class": [
        _p("online EWC", 19.77, _HSU, _HSU_P),
        _p("SI", 19.67, _HSU, _HSU_P),
        _p("offline (joint)", 97.53, _HSU, _HSU_P),
    ],
    "permuted-mnist": [
        _p("VCL", 90.0, _NGUYEN, _VCL_PERM, approx=True),
        _p("VCL + coreset", 93.0, _NGUYEN, _VCL_PERM, approx=True),
        _p("EWC", 84.0, _NGUYEN, _VCL_PERM),
        _p("SI", 86.0, _NGUYEN, _VCL_PERM),
        _p("LP (Laplace propagation)", 82.0, _NGUYEN, _VCL_PERM),
        _p("FROMP", 94.9, "Pan et al. 2020 (FROMP)", "10 tasks, MLP 2x100"),
        _p("EWC", 83.0, _AVA, "Avalanche's permuted-MNIST protocol"),
        _p("plain PyTorch loop, naive", 59.43, _PEER, _PEER_PERM, 17.7),
        _p("plain Lightning, new Trainer per task, naive", 44.14, _PEER, _PEER_PERM, 20.2),
        _p("laplace-torch 0.3 online KFAC", 94.47, _PEER, _PEER_PERM, 81.4),
        _p("laplace-torch 0.3 online diag (exact GGN)", None, _PEER, _PEER_PERM + "; stopped after an hour", None),
        _p("Avalanche Naive", 62.18, _PEER, _PEER_PERM, 64.8),
        _p("Avalanche EWC λ=1e3", 82.03, _PEER, _PEER_PERM, 97.7),
        _p("Avalanche EWC λ=1e4", 56.53, _PEER, _PEER_PERM, 92.6),
        _p("Avalanche SI (no effect)", 62.18, _PEER, _PEER_PERM, 80.1),
    ],
}
