"""Small networks exported to ONNX by the tests (torch's exporter, opset 13), each with a VNNLIB property."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn as nn


class Residual(nn.Module):
    """conv, ReLU, conv + the input (a residual addition), ReLU, linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 1, 3, padding=1)
        self.head = nn.Linear(36, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x))) + x).flatten(1))


class Normalised(nn.Module):
    """(x - mean) / std as arithmetic in the graph, then an MLP."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.13))
        self.register_buffer("std", torch.tensor(0.31))
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.ReLU(), nn.Linear(12, 3))

    def forward(self, x):
        return self.body((x - self.mean) / self.std)


def networks() -> Dict[str, Tuple[nn.Module, Tuple[int, ...]]]:
    """name -> (eval-mode network with random weights and batch-norm statistics, input shape)."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-0.2, 0.2)
        cnn[1].running_var.uniform_(0.5, 1.0)
    return {"mlp": (nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3)), (1, 1, 4, 4)),
            "cnn": (cnn, (1, 1, 8, 8)),
            "residual": (Residual(), (1, 1, 6, 6)),
            "normalised": (Normalised(), (1, 1, 6, 6))}


def export(model: nn.Module, shape: Tuple[int, ...], path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.rand(shape), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}}, opset_version=13, dynamo=False)
    return path


def robustness_property(path: Path, lower: torch.Tensor, upper: torch.Tensor, label: int, classes: int) -> Path:
    """Counterexample: an input in [lower, upper] whose output of some other class is >= that of ``label``."""
    lines = [f"; robustness of class {label}"] + [f"(declare-const X_{i} Real)" for i in range(lower.numel())]
    lines += [f"(declare-const Y_{j} Real)" for j in range(classes)]
    for i, (lo, hi) in enumerate(zip(lower.flatten().tolist(), upper.flatten().tolist())):
        lines += [f"(assert (>= X_{i} {lo!r}))", f"(assert (<= X_{i} {hi!r}))"]
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(classes) if j != label)
    lines.append(f"(assert (or {others}))")
    path.write_text("\n".join(lines) + "\n")
    return path
