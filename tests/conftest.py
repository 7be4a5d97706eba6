import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BAYESCL_DATA", ROOT.parent / "shared" / "data"))
#: CI sets this (.ci/run): a real-data test then fails instead of skipping when its files are missing
REQUIRE_DATA = os.environ.get("BAYESCL_REQUIRE_DATA", "") not in ("", "0")


def _real_data(folder: str, fetch: str) -> Path:
    if not (SHARED / folder / "raw" / "train-images-idx3-ubyte").is_file():
        reason = (f"real {folder} files not found under {SHARED} (set BAYESCL_DATA, or run "
                  f"`bayescl data fetch {fetch}`)")
        if REQUIRE_DATA:
            pytest.fail(reason + "; BAYESCL_REQUIRE_DATA is set")
        pytest.skip(reason)
    return SHARED


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root holding real MNIST; the test is skipped (with the reason in the summary) when it is absent."""
    return _real_data("MNIST", "mnist")


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """The data root holding real Fashion-MNIST (skipped, with the reason, when it is absent)."""
    return _real_data("FashionMNIST", "fashion-mnist")


# ------------------------------------------------------------------------------ models and trainers (factories)
@pytest.fixture(scope="session")
def small_model():
    """``small_model(hidden=(16,), num_tasks=3, seed=0, **kw)``: a MultiHeadMLP built right after
    ``torch.manual_seed(seed)`` (no reseeding when ``seed`` is None); ``kw`` go to MultiHeadMLP."""
    from bayescl import MultiHeadMLP

    def small_model(hidden=(16,), num_tasks=3, seed=0, **kw):
        if seed is not None:
            torch.manual_seed(seed)
        return MultiHeadMLP(hidden=hidden, num_tasks=num_tasks, **kw)

    return small_model


@pytest.fixture(scope="session")
def make_trainer():
    """``make_trainer(cb, epochs=1, extra=(), double=False, enable_checkpointing=False, **kw)``: a quiet one-device
    CPU Lightning trainer with the callback ``cb`` (then ``extra``); ``double`` trains in float64, ``kw`` go to
    ``pl.Trainer``."""
    import pytorch_lightning as pl

    def make_trainer(cb, epochs=1, extra=(), double=False, enable_checkpointing=False, **kw):
        if double:
            kw["precision"] = "64-true"
        return pl.Trainer(max_epochs=epochs, callbacks=[cb, *extra], accelerator="cpu", devices=1, logger=False,
                          enable_checkpointing=enable_checkpointing, enable_model_summary=False,
                          enable_progress_bar=False, num_sanity_val_steps=0, **kw)

    return make_trainer


def _bitwise_equal(a, b, path: str = "state") -> None:
    """Two nested states (dicts, lists, tensors) hold the same keys and bit-identical tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _bitwise_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _bitwise_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, path


def _close_states(a, b, rtol: float, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, path
        if a.numel():
            assert float((a - b).abs().max()) <= rtol * float(b.abs().max()) + 1e-12, path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            if k != "tag":  # a Kronecker term's tag is a random identity, not a number
                _close_states(a[k], b[k], rtol, f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close_states(x, y, rtol, f"{path}/{i}")
    elif isinstance(a, float):  # a number computed from reduced tensors (a normalised site's scale)
        assert isinstance(b, float) and abs(a - b) <= rtol * abs(b) + 1e-12, path
    else:
        assert a == b, path


@pytest.fixture(scope="session")
def assert_states_close():
    """``assert_states_close(a, b, rtol, path)``: nested states with the same keys (Kronecker tags aside) and
    tensors within ``rtol`` of the reference's largest entry."""
    return _close_states


@pytest.fixture(scope="session")
def assert_bitwise_equal():
    """``assert_bitwise_equal(a, b)``: nested states with the same keys and bit-identical tensors."""
    return _bitwise_equal


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Job:
    """A subprocess of a test: its own session (so its whole process group can be killed), output to ``log``.

    :meth:`finish` waits until ``deadline`` (``time.monotonic()``) at most, then kills the group whatever happened.
    """

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.log = log
        self._fh = open(log, "w")  # noqa: SIM115 - closed by finish
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def finish(self, deadline: float) -> tuple[int | None, str, bool]:
        """``(returncode, or None if it ran past the deadline; the log; whether a process outlived the kill)``."""
        try:
            rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self._fh.close()
        end = time.monotonic() + 5.0
        while _group_alive(self.proc.pid) and time.monotonic() < end:
            time.sleep(0.05)
        return rc, self.log.read_text(), _group_alive(self.proc.pid)


@pytest.fixture(scope="session")
def start_job():
    """``start_job(cmd, log, env=None)`` starts a :class:`Job` (a bounded, killable subprocess of a test)."""
    return Job
