"""The DARTS supernet pieces: the mixed operation (and, later, search cells)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from certnas.space.ops import OPS, PRIMITIVES


class MixedOp(nn.Module):
    """Sum of all operations on one edge, weighted by ``softmax(architecture parameters)``.

    ``forward(x, weights)``: x (B, C, H, W); weights (K,) non-negative mixing weights in the order
    of ``primitives``. The ``none`` operation contributes exactly zero and is skipped (it still
    takes part in the softmax through its weight).
    """

    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES, affine: bool = False):
        super().__init__()
        self.primitives = tuple(primitives)
        self.ops = nn.ModuleList(OPS[name](C, stride, affine) for name in self.primitives)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        total = None
        for index, (name, op) in enumerate(zip(self.primitives, self.ops)):
            if name == "none":
                continue
            term = weights[index] * op(x)
            total = term if total is None else total + term
        if total is None:  # only `none` on this edge
            total = self.ops[0](x)
        return total
