"""The DARTS / PC-DARTS supernet: mixed operation, search cell, search network.

Architecture weights are registered parameters of ``SearchNetwork`` (``arch_normal`` and
``arch_reduce``, shape (edges, operations)), so checkpoints hold them and optimisers see them.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence

import torch
import torch.nn as nn

from certnas.space.network import is_reduction
from certnas.space.ops import (OPS, PRIMITIVES, ChannelMap, FactorizedReduce, GlobalAvgPool, MaxPool2x2,
                               Normalize, ReLUConvBN)


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


class PartialMixedOp(nn.Module):
    """PC-DARTS partial-channel edge: the mixed op sees ``C / K`` channels, the rest bypass it
    (2x2 max-pooled at stride 2), and the result is channel-shuffled with K groups.

    Selection, bypass and shuffle are fixed 1x1 convolutions (and ReLU for the max pool), so the
    edge stays inside what the bound engine bounds soundly.
    """

    def __init__(self, C: int, stride: int, K: int, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        if C % K:
            raise ValueError(f"partial channels: {C} channels are not divisible by K={K}")
        part = C // K
        self.select = ChannelMap(C, list(range(part)))
        self.bypass_select = ChannelMap(C, list(range(part, C)))
        self.mixed = MixedOp(part, stride, primitives, affine=False)
        self.bypass_pool = MaxPool2x2(C - part) if stride == 2 else None
        # channel_shuffle(cat(a, b), K): concatenated channel i lands at (i mod part) * K + i // part.
        destination = [(i % part) * K + i // part for i in range(C)]
        source = [0] * C
        for i, out in enumerate(destination):
            source[out] = i
        self.place_mixed = ChannelMap(part, [i if i < part else -1 for i in source])
        self.place_bypass = ChannelMap(C - part, [i - part if i >= part else -1 for i in source])

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        bypass = self.bypass_select(x)
        if self.bypass_pool is not None:
            bypass = self.bypass_pool(bypass)
        return self.place_mixed(self.mixed(self.select(x), weights)) + self.place_bypass(bypass)


def edge_count(steps: int) -> int:
    """Edges of a cell with ``steps`` intermediate nodes (node i has i + 2 inputs): 14 for 4."""
    return sum(2 + i for i in range(steps))


class SearchCell(nn.Module):
    """A DARTS search cell: two preprocessed inputs, ``steps`` nodes, every edge a MixedOp; the
    output concatenates the last ``multiplier`` nodes along channels."""

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, primitives: Sequence[str] = PRIMITIVES,
                 partial_channels: int = 1):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        self.preprocess0 = (FactorizedReduce(C_prev_prev, C, affine=False) if reduction_prev
                            else ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(C, stride, primitives, affine=False) if partial_channels == 1
                                  else PartialMixedOp(C, stride, partial_channels, primitives))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                edge_weights: torch.Tensor = None) -> torch.Tensor:
        """weights: (edges, K) mixing weights of this cell type; edge_weights: optional (edges,)
        edge-normalisation weights (softmax over each node's incoming edges)."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            node = None
            for j, h in enumerate(states):
                term = self.edges[offset + j](h, weights[offset + j])
                if edge_weights is not None:
                    term = edge_weights[offset + j] * term
                node = term if node is None else node + term
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self.multiplier:], dim=1)


class SearchNetwork(nn.Module):
    """Stem, ``layers`` search cells (reduction at 1/3 and 2/3 of the depth), global pooling, linear.
    ``stem``: ``cifar`` (3x3 convolution, stride 1, as DARTS) or ``strided`` (stride 2: the cells see
    half the resolution, a quarter of the cost).

    Input (B, in_channels, H, W) in [0, 1]; ``mean`` / ``std`` normalisation is the first layer, so
    every eps is in pixel units. Output (B, num_classes) logits.
    """

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, in_channels: int = 3,
                 steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3,
                 primitives: Sequence[str] = PRIMITIVES, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,), partial_channels: int = 1, edge_normalization: bool = False,
                 stem: str = "cifar"):
        super().__init__()
        self.primitives = tuple(primitives)
        self.steps = steps
        self.multiplier = multiplier
        self.edge_normalization = edge_normalization
        self.normalize = Normalize(mean, std, in_channels)
        C_curr = stem_multiplier * C
        if stem not in ("cifar", "strided"):
            raise ValueError(f"unknown supernet stem {stem!r}; known: cifar, strided")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, stride=2 if stem == "strided" else 1, padding=1,
                                            bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = is_reduction(i, layers)
            if reduction:
                C_curr *= 2
            cell = SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, primitives,
                              partial_channels)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.pool = GlobalAvgPool()
        self.classifier = nn.Linear(C_prev, num_classes)
        edges = edge_count(steps)
        self.arch_normal = nn.Parameter(1e-3 * torch.randn(edges, len(self.primitives)))
        self.arch_reduce = nn.Parameter(1e-3 * torch.randn(edges, len(self.primitives)))
        if edge_normalization:
            self.edge_normal = nn.Parameter(1e-3 * torch.randn(1, edges))
            self.edge_reduce = nn.Parameter(1e-3 * torch.randn(1, edges))

    def cell_types(self) -> List[bool]:
        """The cell types (``reduction`` flags) this supernet has: a network of fewer than 3 cells
        has no reduction cell, so its reduction architecture weights get no gradient."""
        return sorted({cell.reduction for cell in self.cells})

    def arch_parameters(self) -> List[nn.Parameter]:
        extra = [self.edge_normal, self.edge_reduce] if self.edge_normalization else []
        return [self.arch_normal, self.arch_reduce] + extra

    def searched_arch_parameters(self) -> List[nn.Parameter]:
        """The architecture parameters of the cell types this supernet has (:meth:`cell_types`)."""
        normal = [self.arch_normal] + ([self.edge_normal] if self.edge_normalization else [])
        reduce = [self.arch_reduce] + ([self.edge_reduce] if self.edge_normalization else [])
        return (normal if False in self.cell_types() else []) + (reduce if True in self.cell_types() else [])

    def edge_weights(self, reduction: bool) -> torch.Tensor:
        """(edges,) softmax of the edge-normalisation parameters over each node's incoming edges."""
        beta = self.edge_reduce if reduction else self.edge_normal
        parts, start = [], 0
        for node in range(self.steps):
            count = node + 2
            # softmax over a (1, n) slice: auto_LiRPA 0.3 cannot trace a softmax over a 1-D tensor
            parts.append(torch.softmax(beta[:, start:start + count], dim=-1))
            start += count
        return torch.cat(parts, dim=-1)[0]

    def mixing_weights(self, reduction: bool) -> torch.Tensor:
        """(edges, K) softmax of the architecture parameters of one cell type."""
        return torch.softmax(self.arch_reduce if reduction else self.arch_normal, dim=-1)

    def genotype(self):
        """The discrete cell by the DARTS rule (edge-normalisation weights included when on)."""
        from certnas.space.genotype import Genotype, derive_cell
        cells = {}
        for name, reduction in (("normal", False), ("reduce", True)):
            edges = self.edge_weights(reduction) if self.edge_normalization else None
            cells[name] = derive_cell(self.mixing_weights(reduction), self.steps, self.primitives, edges)
        concat = tuple(range(2 + self.steps - self.multiplier, self.steps + 2))
        if not any(self.cell_types()):  # no reduction cell: its weights never moved, so no cell is derived
            return Genotype(cells["normal"], concat, None, None)
        return Genotype(cells["normal"], concat, cells["reduce"], concat)

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return (p for p in self.parameters() if id(p) not in arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(self.normalize(x))
        weights = {r: self.mixing_weights(r) for r in (False, True)}
        edges = {r: self.edge_weights(r) for r in (False, True)} if self.edge_normalization else {False: None, True: None}
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights[cell.reduction], edges[cell.reduction])
        return self.classifier(self.pool(s1))
