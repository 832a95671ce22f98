"""What attack and verification runs share: a model file and the test samples it is evaluated on.

The samples are ``n`` test-split samples drawn with ``seed`` (the same seed gives the same samples
to ``certnas attack`` and ``certnas verify``); the data set defaults to the one the model was
trained on, and must match the model's input shape and class count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from certnas.data import DataError, load_data
from certnas.io import load_model_with_meta
from certnas.runs import collate


@dataclass
class Evaluation:
    """A model (eval mode) with its metadata and the samples it is evaluated on."""
    model: nn.Module
    meta: Dict[str, Any]
    x: torch.Tensor        # (n, C, H, W) in [0, 1]
    y: torch.Tensor        # (n,)
    indices: torch.Tensor  # (n,) positions in the test split
    data: str


def sample_indices(count: int, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct indices in ``[0, count)`` drawn with ``seed`` (n = 0: all, in order)."""
    if n < 0:
        raise DataError(f"--n must be >= 0, got {n}")
    if n > count:
        raise DataError(f"--n {n} is larger than the {count} test samples of the data set")
    if n == 0:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def prepare(model_path: Path, *, data: Optional[str], data_root: Optional[Path], n: int, seed: int,
            device: str, image_size: Optional[int] = None) -> Evaluation:
    """Load the model (a certnas model file, or an ONNX file: .onnx) and ``n`` matching test samples onto
    ``device``."""
    model, meta = load_any_model(Path(model_path), device)
    trained_on = meta.get("dataset", {})
    name = data or trained_on.get("name")
    if name is None:
        raise DataError(f"{model_path}: the model file names no data set; pass --data")
    size = image_size or trained_on.get("image_size") or meta["network"].get("image_size") or 32
    splits = load_data(name, data_root, seed=seed, image_size=size)
    network = meta["network"]
    info = splits.info
    expected = (network["in_channels"], network["image_size"], network["num_classes"])
    if (info.in_channels, info.image_size, info.num_classes) != expected:
        raise DataError(f"data set {name} has {info.in_channels} channel(s), {info.image_size}x{info.image_size} "
                        f"pixels and {info.num_classes} classes; the model expects {expected[0]}, "
                        f"{expected[1]}x{expected[1]} and {expected[2]}")
    indices = sample_indices(len(splits.test), n, seed)
    x, y = collate(splits.test, indices, torch.device(device))
    return Evaluation(model, meta, x, y, indices, name)


def load_any_model(path: Path, device: str = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """A certnas model file with its metadata, or an ONNX classifier of images (``(1, C, H, H)`` input,
    ``(1, K)`` output) converted and checked by ``verifiers.onnx_model``, with metadata of that shape."""
    if path.suffix.lower() != ".onnx":
        return load_model_with_meta(path, map_location=device)
    from verifiers.onnx_model import load_onnx
    loaded = load_onnx(path)
    shape, out = loaded.input_shape, loaded.output_shape
    if len(shape) != 4 or shape[2] != shape[3] or len(out) != 2:
        raise DataError(f"{path}: certnas verify on a data set needs an image classifier with input (1, C, H, H) "
                        f"and output (1, K); this model has input {shape} and output {out} (use --vnnlib)")
    meta = {"network": {"in_channels": shape[1], "image_size": shape[2], "num_classes": out[1]},
            "source": "onnx", "opset": loaded.opset, "onnxruntime_difference": loaded.runtime_difference}
    return loaded.model.to(device), meta


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(B,) predicted classes, in batches."""
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
