import os
from pathlib import Path

import pytest

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
