"""The README runs as written: its Quickstart is exactly two commands, its links resolve inside the repository, and
every ```python block executes, in order, in one namespace (as a user pasting them into one session would).

The blocks name the real scenario (``make_stream("split-mnist-task")``); the ``tiny_streams`` fixture makes
``bayescl.make_stream`` return a tiny synthetic stream of two tasks instead, so the blocks run in seconds and need no
data files. Nothing else is provided: a block that uses a name no earlier block defined or imported fails here.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bayescl

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def quickstart_commands() -> list[str]:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.DOTALL)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def python_blocks(path: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    cmds = quickstart_commands()
    assert cmds == ["make bench", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^bench:", makefile, flags=re.MULTILINE) and re.search(r"^test:", makefile, flags=re.MULTILINE)
    assert "pytest" in makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]


@pytest.mark.parametrize("doc", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(doc):
    def slugs(markdown: str) -> set[str]:
        return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)}

    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        if not path:  # a link to a heading of this page
            assert anchor in slugs(text), f"{doc.name}: no heading for #{anchor}"
            continue
        resolved = (doc.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert resolved.exists(), f"{doc.name} links to a missing file: {target}"
        if anchor and resolved.suffix == ".md":  # a heading of another page
            assert anchor in slugs(resolved.read_text()), f"{doc.name}: {path} has no heading for #{anchor}"


def test_lazy_submodules_after_a_bare_import():
    """``import bayescl`` alone gives ``bayescl.predictive``, ``bayescl.uncertainty`` and ``bayescl.avalanche``."""
    code = ("import bayescl\n"
            "assert callable(bayescl.predictive.predictive) and callable(bayescl.uncertainty.decompose)\n"
            "assert bayescl.marglik is not None\n"
            "print(bayescl.avalanche.LaplacePlugin.__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "LaplacePlugin"


@pytest.fixture
def tiny_streams(monkeypatch):
    """``bayescl.make_stream(<any name>)`` gives a 2-task synthetic stream (MNIST-shaped, 256 examples a task)."""
    from bayescl.harness.data import synthetic_stream

    monkeypatch.setattr(bayescl, "make_stream", lambda scenario, **kw: synthetic_stream(num_tasks=2))


@pytest.mark.slow
def test_python_blocks_run_as_written(tiny_streams, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # Lightning writes nothing into the repository
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
        except Exception as exc:
            raise AssertionError(f"README python block {i + 1} failed: {exc!r}\n{block}") from exc
    assert namespace["laplace"].tasks_seen == 2 and namespace["vcl"].tasks_seen == 2
    assert namespace["probs"].shape == (128, 2) and namespace["parts"]["epistemic"].shape == (128,)


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="the `lightning` package is not installed")
def test_callbacks_work_with_the_lightning_package(tmp_path, monkeypatch):
    """``import lightning as L``: an ``L.Trainer`` fitting an ``L.LightningModule`` takes the callbacks."""
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    monkeypatch.chdir(tmp_path)
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
    for cb in (bayescl.LaplaceCallback(structure="diag"), bayescl.VCLCallback()):
        model = Net()
        for _ in range(2):
            L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False).fit(model, loader)
        assert cb.tasks_seen == 2 and cb.posterior() is not None
