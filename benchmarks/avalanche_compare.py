"""Avalanche's own methods beside bayescl's Laplace plugin, on the same data and protocol.

Split MNIST (5 experiences 0/1 … 8/9, pixels in [0, 1]) from the shared MNIST files through Avalanche's
``SplitMNIST(..., dataset_root=...)``, in one of three settings (``--setting``): ``task`` (default; local labels 0/1,
task labels given, one multi-head MLP 2x256: an Avalanche ``MultiTaskModule`` with a ReLU trunk 784-256-256 and a
``MultiHeadClassifier`` that grows a 2-way head per experience), ``domain`` (local labels 0/1, no task labels, one
2-way head) or ``class`` (global labels 0..9, no task labels, one 10-way head); Adam 1e-3, batch 64, 5 epochs per experience, Avalanche's default optimizer handling (one Adam,
re-targeted at the new parameters at each experience, its state kept). After every experience the model is
evaluated on the test experiences seen so far (Avalanche's ``EvaluationPlugin``, ``Top1_Acc_Exp``), which fills
the accuracy matrix; the reported accuracy is the mean over the 5 tasks after the last one.

Runs: Avalanche ``Naive``; ``EWC`` (separate) and ``EWC`` online (decay 0.9) over a λ grid; ``SynapticIntelligence``
over a λ grid; Avalanche's experience replay at bayescl's ER memory: ``Naive`` with a ``ReplayPlugin`` whose
``ExperienceBalancedBuffer`` holds ``--memory-per-task`` examples (200) of every experience (fixed, not adaptive:
``mem_size`` = 200 x 5, of which each experience keeps 200 from the start, as ``ReplayCallback`` does); each step
concatenates a current and a memory minibatch of 64 and averages the loss over both (``ReplayCallback`` adds the
two means: twice the gradient, the same direction); bayescl's ``LaplacePlugin`` inside ``Naive`` with the callback of the ``laplace-diag`` and
``laplace-kron`` recipes (λ 1 and 100) and of ``laplace-default`` (``LaplaceCallback()``: its defaults). λ is chosen on the *test* accuracy (there is no validation
split), which flatters the tuned baselines. The ``strategies/avalanche-*.yaml`` recipes (key ``avalanche:``,
``class_path`` / ``init_args``; a mapping with a ``class_path`` anywhere in ``init_args``, e.g. a plugin and its
storage policy, is built too) can be run with ``--recipes``; ``--ours`` adds bayescl harness results to the table
(e.g. ``ReplayCallback``'s ``er`` recipe on ``--scenario avalanche:SplitMNIST:return_task_id=false,...``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/avalanche_compare.py --root /work/shared/data --seeds 1 \
        --ours /tmp/avl_ours/split-mnist-task/laplace-diag.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/avalanche_compare.py --setting class --recipes avalanche-naive,\
        avalanche-replay --out /tmp/avl-class
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import shlex
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avalanche.benchmarks.classic import SplitMNIST
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin

from bayescl import VCLCallback
from bayescl.avalanche import LaplacePlugin, VCLPlugin
from bayescl.harness.metrics import mean_std, summarize
from bayescl.harness.recipes import load_recipe

#: ``--setting`` -> the SplitMNIST options and the outputs of the (single) head; ``task`` is multi-head
SETTINGS: dict[str, tuple[dict[str, Any], int]] = {
    "task": ({"return_task_id": True, "class_ids_from_zero_in_each_exp": True}, 2),
    "domain": ({"return_task_id": False, "class_ids_from_zero_in_each_exp": True}, 2),
    "class": ({"return_task_id": False, "class_ids_from_zero_in_each_exp": False}, 10),
}
SCENARIO = "split-mnist-task"  # the default setting's name; a run's is f"split-mnist-{setting}"


class MultiHeadMLP(MultiTaskModule):
    """Trunk 784-256-256 (ReLU) and an Avalanche ``MultiHeadClassifier`` (one 2-way head per experience)."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                   nn.ReLU())
        self.classifier = MultiHeadClassifier(hidden, initial_out_features=2)

    def forward(self, x, task_labels):
        return self.classifier(self.trunk(x), task_labels)

    def forward_single_task(self, x, task_label):
        return self.classifier(self.trunk(x), task_label)


def make_model(setting: str) -> nn.Module:
    """The multi-head MLP for ``task``; otherwise the same MLP 784-256-256 with one head of the setting's outputs."""
    if setting == "task":
        return MultiHeadMLP()
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, SETTINGS[setting][1]))


def build(value: Any) -> Any:
    """``init_args`` values with every ``{class_path, init_args}`` mapping (also inside lists) instantiated."""
    if isinstance(value, dict) and "class_path" in value:
        if set(value) - {"class_path", "init_args"}:
            raise ValueError(f"{value!r}: a class spec has only 'class_path' and 'init_args'.")
        return load_class(value["class_path"])(**build(value.get("init_args") or {}))
    if isinstance(value, dict):
        return {k: build(v) for k, v in value.items()}
    if isinstance(value, list):
        return [build(v) for v in value]
    return value


def replay_spec(memory_per_task: int, experiences: int = 5) -> dict[str, Any]:
    """Avalanche ``Naive`` + ``ReplayPlugin`` keeping ``memory_per_task`` examples of every experience (a fixed
    ``ExperienceBalancedBuffer``: bayescl ``ReplayCallback``'s memory at every stage, not only after the last)."""
    mem = memory_per_task * experiences
    policy = {"class_path": "avalanche.training.storage_policy.ExperienceBalancedBuffer",
              "init_args": {"max_size": mem, "adaptive_size": False, "num_experiences": experiences}}
    return {"name": f"replay mem={memory_per_task}/exp", "class_path": "avalanche.training.Naive",
            "init_args": {"plugins": [{"class_path": "avalanche.training.plugins.ReplayPlugin",
                                       "init_args": {"mem_size": mem, "storage_policy": policy}}]}}


def fix_si_on_cpu() -> None:
    """Avalanche 0.6's SI stores ``param.detach().cpu().flatten()``: on a CPU device that is a *view* of the live
    parameter, so the "old" and "new" weights of every step are the same tensor, the path integral is 0 and SI
    is a no-op whatever λ. This stores a copy instead (``--fix-si``); on a GPU ``.cpu()`` already copies."""
    from avalanche.training.plugins.synaptic_intelligence import SynapticIntelligencePlugin as SI

    def extract_weights(model, target, excluded_parameters):
        for name, param in SI.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().cpu().flatten().clone()

    SI.extract_weights = staticmethod(torch.no_grad()(extract_weights))


def grid(ewc_lambdas=(1e2, 1e3, 1e4), si_lambdas=(1.0, 10.0, 100.0),
         memory_per_task: int = 200) -> list[dict[str, Any]]:
    """The runs of the default sweep: name, Avalanche strategy ``class_path`` / ``init_args``, bayescl recipe."""
    runs: list[dict[str, Any]] = [{"name": "naive", "class_path": "avalanche.training.Naive", "init_args": {}}]
    for lam in ewc_lambdas:
        runs.append({"name": f"ewc lam={lam:g}", "class_path": "avalanche.training.EWC",
                     "init_args": {"ewc_lambda": lam, "mode": "separate"}})
    for lam in ewc_lambdas:
        runs.append({"name": f"ewc-online lam={lam:g}", "class_path": "avalanche.training.EWC",
                     "init_args": {"ewc_lambda": lam, "mode": "online", "decay_factor": 0.9}})
    for lam in si_lambdas:
        runs.append({"name": f"si lam={lam:g}", "class_path": "avalanche.training.SynapticIntelligence",
                     "init_args": {"si_lambda": lam}})
    runs.append(replay_spec(memory_per_task))
    for recipe in ("laplace-diag", "laplace-kron", "laplace-default"):
        runs.append({"name": f"bayescl LaplacePlugin ({recipe} recipe)", "class_path": "avalanche.training.Naive",
                     "init_args": {}, "bayescl_recipe": recipe})
    return runs


def recipe_runs(names: list[str]) -> list[dict[str, Any]]:
    """Runs from ``strategies/<name>.yaml`` recipes with an ``avalanche:`` key."""
    runs = []
    for name in names:
        path = Path(name) if name.endswith(".yaml") else ROOT / "strategies" / f"{name}.yaml"
        doc = yaml.safe_load(path.read_text())
        spec = doc.get("avalanche")
        if not isinstance(spec, dict) or "class_path" not in spec:
            raise ValueError(f"{path} has no 'avalanche: {{class_path, init_args}}' entry.")
        runs.append({"name": doc.get("name", path.stem), "class_path": spec["class_path"],
                     "init_args": spec.get("init_args") or {}})
    return runs


PROTOCOL = {"task": "local labels, task labels given; multi-head MLP 2x256 (Avalanche MultiHeadClassifier)",
            "domain": "local labels 0/1, no task labels; MLP 2x256 with one 2-way head",
            "class": "global labels 0..9, no task labels; MLP 2x256 with one 10-way head"}


def load_class(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def run_one(spec: dict[str, Any], benchmark, seed: int, args, eval_stream: str = "test") -> dict[str, Any]:
    """One seed of ``spec`` over ``benchmark``'s train stream; after every experience the model is evaluated on the
    experiences seen so far of ``benchmark.<eval_stream>_stream`` (``"test"``; ``avalanche_tune.py`` passes
    ``"valid"``)."""
    RNGManager.set_random_seeds(seed)
    torch.manual_seed(seed)
    model = make_model(args.setting)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    init_args = build(spec["init_args"])  # fresh plugins (and their buffers) for every seed
    plugins = list(init_args.pop("plugins", None) or [])
    if spec.get("bayescl_recipe"):
        recipe = load_recipe(spec["bayescl_recipe"])
        if spec.get("bayescl_init_args"):  # merged into the recipe's callback, as a tune grid merges its values
            first = recipe.callbacks[0]
            recipe = replace(recipe, callbacks=[{**first, "init_args": {**(first.get("init_args") or {}),
                                                                         **spec["bayescl_init_args"]}}])
        callback = recipe.build_callbacks()[0]
        plugins.append(VCLPlugin(callback=callback) if isinstance(callback, VCLCallback)
                       else LaplacePlugin(callback=callback))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    cls = load_class(spec["class_path"])
    strategy = cls(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=args.batch_size,
                   train_epochs=args.epochs, eval_mb_size=1000, device="cpu", plugins=plugins, evaluator=evaluator,
                   **init_args)
    T = len(benchmark.train_stream)
    R = torch.full((T, T), float("nan"))
    fit = 0.0
    t0 = time.perf_counter()
    for i, exp in enumerate(benchmark.train_stream):
        t_fit = time.perf_counter()
        # Avalanche keeps Adam's state across experiences; --reset-optimizer clears it (as a new Lightning fit does).
        # (The first experience must not get the keyword: Avalanche passes it itself there.)
        strategy.train(exp, **({"reset_optimizer_state": True} if args.reset_optimizer and i > 0 else {}))
        fit += time.perf_counter() - t_fit
        stream = getattr(benchmark, f"{eval_stream}_stream")[: i + 1]
        res = strategy.eval(stream)
        for j, te in enumerate(stream):  # keyed by the experience's own stream, task label and index
            R[i, j] = res[f"Top1_Acc_Exp/eval_phase/{te.origin_stream.name}_stream/Task{te.task_label:03d}/"
                          f"Exp{te.current_experience:03d}"]
        print(f"  {spec['name']} seed {seed} exp {i + 1}/{T}: mean acc on seen "
              f"{100 * float(R[i, : i + 1].mean()):.2f} [{' '.join(f'{100 * float(a):.1f}' for a in R[i, : i + 1])}]",
              flush=True)
    return {"seed": seed, "accuracy_matrix": R.tolist(), **summarize(R),
            "wall_seconds": time.perf_counter() - t0, "fit_seconds": fit}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Avalanche 0.6 strategies vs bayescl on {result['scenario']}",
        "",
        "Commands (`OMP_NUM_THREADS=1`, from the repository root; the table merges their outputs):",
        "",
        *[f"    {c}" for c in result.get("commands") or [result["command"]]],
        "",
        f"Protocol: {result['protocol']}",
        "",
        "| method | runs in | accuracy (%) | BWT (%) | wall time (s) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['runs_in']} | failed: {r['error'][:80]} | | | |")
            continue
        acc, bwt, wall = r["avg_accuracy"], r["bwt"], r["wall_seconds"]
        pm = lambda d, k=100: f"{k * d['mean']:.2f}" + (f" ± {k * d['std']:.2f}" if d["std"] else "")
        lines.append(f"| {r['name']} | {r['runs_in']} | {pm(acc)} | {pm(bwt)} | {pm(wall, 1)} | {len(r['per_seed'])} |")
    swept = any("lam=" in r["name"] for r in result["runs"])  # the grid's EWC / SI rows
    lines += ["", ("The lam=… rows' λ was chosen on test accuracy (no validation split). " if swept else "")
              + ("Wall time: training plus the evaluations after every experience, one process, "
                 "`OMP_NUM_THREADS=1`, on a 2-core CPU shared with other jobs."), ""]
    return "\n".join(lines)


def ours_entry(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    try:
        callbacks = [c["class_path"].rpartition(".")[2] for c in load_recipe(doc["strategy"]).callbacks]
    except ValueError:  # a recipe no longer found: the JSON still says what ran
        callbacks = []
    what = " + ".join(callbacks) or "no callback"
    return {"name": f"bayescl {what} ({doc['strategy']} recipe)",
            "runs_in": f"bayescl harness (Lightning), {doc['scenario']}",
            "command": doc.get("command"), "avg_accuracy": doc["avg_accuracy"], "bwt": doc["bwt"],
            "wall_seconds": doc["wall_seconds"], "per_seed": doc["per_seed"], "source": str(path)}


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    """The data and training options every run here shares (this script's and ``avalanche_tune.py``'s)."""
    p.add_argument("--root", default=str(ROOT.parent / "shared" / "data"), help="MNIST root (torchvision layout)")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="task",
                   help="task: multi-head, task labels given; domain: one 2-way head; class: one 10-way head")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fix-si", action="store_true", help="patch Avalanche 0.6's SI no-op on CPU (see fix_si_on_cpu)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_protocol_arguments(p)
    p.add_argument("--memory-per-task", type=int, default=200, help="examples per experience of the replay run")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--ewc-lambdas", type=float, nargs="+", default=[1e2, 1e3, 1e4])
    p.add_argument("--si-lambdas", type=float, nargs="+", default=[1.0, 10.0, 100.0],
                   help="Avalanche's SI clamps each importance to 1e-3 (clip_to), so it needs large values")
    p.add_argument("--report-only", action="store_true", help="run nothing: rebuild the table from --merge/--ours")
    p.add_argument("--reset-optimizer", action="store_true",
                   help="reset Adam's state at every experience (bayescl's harness: a new optimizer per fit)")
    p.add_argument("--only", default="", help="comma-separated substrings: run only the matching grid entries")
    p.add_argument("--recipes", default="", help="comma-separated avalanche-* recipes to run instead of the grid")
    p.add_argument("--ours", nargs="*", default=[], help="bayescl harness JSON files to add to the table")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "avalanche"))
    p.add_argument("--merge", nargs="*", default=[],
                   help="earlier JSON outputs of this script whose runs are added to this one's table")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    if args.fix_si:
        fix_si_on_cpu()
    runs = (recipe_runs(args.recipes.split(",")) if args.recipes
            else grid(args.ewc_lambdas, args.si_lambdas, args.memory_per_task))
    if args.report_only:
        runs = []
    if args.only:
        keys = [k for k in args.only.split(",") if k]
        runs = [r for r in runs if any(k in r["name"] for k in keys)]
    if args.setting != "task" and any(r.get("bayescl_recipe") for r in runs):
        runs = [r for r in runs if not r.get("bayescl_recipe")]  # the grid's LaplacePlugin rows are task-IL only
    scenario = f"split-mnist-{args.setting}"
    benchmark = SplitMNIST(5, fixed_class_order=list(range(10)), train_transform=None, eval_transform=None,
                           dataset_root=args.root, **SETTINGS[args.setting][0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "scenario": scenario,
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "protocol": (f"Avalanche SplitMNIST(5, classes 0/1..8/9, {PROTOCOL[args.setting]}), pixels in [0, 1]; "
                     f"Adam lr {args.lr}, batch "
                     f"{args.batch_size}, {args.epochs} epochs per experience; accuracy = mean over the 5 tasks "
                     "after the last one"),
        "config": vars(args),
        "runs": [],
    }
    for spec in runs:
        entry = {**spec, "runs_in": "Avalanche Naive + plugin" if spec.get("bayescl_recipe") else "Avalanche"}
        if args.fix_si and "SynapticIntelligence" in spec["class_path"]:
            entry["name"] += ", CPU fix"
        if args.reset_optimizer:
            entry["name"] += ", Adam reset per experience"
            entry["runs_in"] += " (optimizer reset)"
        try:
            per_seed = [run_one(spec, benchmark, s, args) for s in range(args.seeds)]
        except Exception as exc:  # noqa: BLE001 - a failing run is recorded, the others still run
            entry["error"] = f"{type(exc).__name__}: {exc}"
            result["runs"].append(entry)
            print(f"{spec['name']}: FAILED {entry['error']}", flush=True)
            (out / f"{scenario}.json").write_text(json.dumps(result, indent=1))
            continue
        entry["per_seed"] = per_seed
        for k in ("avg_accuracy", "bwt", "forgetting", "wall_seconds", "fit_seconds"):
            entry[k] = mean_std([r[k] for r in per_seed])
        result["runs"].append(entry)
        print(f"{spec['name']}: acc {100 * entry['avg_accuracy']['mean']:.2f}, "
              f"wall {entry['wall_seconds']['mean']:.1f} s", flush=True)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (out / f"{scenario}.json").write_text(json.dumps(result, indent=1))
    result["commands"] = [result["command"]] if runs else []
    for path in args.merge:
        doc = json.loads(Path(path).read_text())
        done = {r["name"] for r in result["runs"]}
        result["runs"] += [r for r in doc["runs"] if r["name"] not in done]
        result["commands"] += [c for c in doc.get("commands", [doc["command"]]) if c not in result["commands"]]
    for path in args.ours:
        result["runs"].append(ours_entry(Path(path)))
        if result["runs"][-1]["command"] not in result["commands"]:
            result["commands"].append(result["runs"][-1]["command"])
    (out / f"{scenario}.json").write_text(json.dumps(result, indent=1))
    (out / f"{scenario}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
