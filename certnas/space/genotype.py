"""Genotypes: the discrete cell an architecture search ends with.

A genotype is an immutable value: for each of the two cell types, a tuple of ``(operation,
input_node)`` pairs, two per intermediate node (inputs 0 and 1 are the cell's two inputs), plus the
nodes concatenated into the output. ``to_json`` / ``from_json`` round-trip it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Dict, List, Sequence, Tuple

import torch

from certnas.space.ops import OPS, PRIMITIVES
from certnas.errors import CertnasError

Edge = Tuple[str, int]


class GenotypeError(CertnasError):
    """A genotype that does not describe a valid cell."""


@dataclass(frozen=True)
class Genotype:
    """A normal and a reduction cell: two (operation, input node) edges per node and the nodes concatenated.
    ``reduce`` is None where no reduction cell was searched (a supernet of fewer than 3 cells has none): a
    network that needs one cannot be built from it (``needs_reduce``)."""
    normal: Tuple[Edge, ...]
    normal_concat: Tuple[int, ...]
    reduce: Optional[Tuple[Edge, ...]]
    reduce_concat: Optional[Tuple[int, ...]]

    def __post_init__(self):
        for name in ("normal", "reduce"):
            edges = getattr(self, name)
            if edges is None and name == "reduce":
                continue
            if len(edges) % 2:
                raise GenotypeError(f"{name} must list two edges per node, got {len(edges)} edges")
            for index, (op, source) in enumerate(edges):
                if op not in OPS:
                    raise GenotypeError(f"{name}: unknown operation {op!r}; known: {', '.join(OPS)}")
                if not 0 <= source < 2 + index // 2:
                    raise GenotypeError(f"{name}: edge {index} reads node {source}, which does not exist yet")

    def to_dict(self) -> Dict[str, Optional[list]]:
        return {"normal": [list(e) for e in self.normal], "normal_concat": list(self.normal_concat),
                "reduce": None if self.reduce is None else [list(e) for e in self.reduce],
                "reduce_concat": None if self.reduce_concat is None else list(self.reduce_concat)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Dict) -> "Genotype":
        """From ``to_dict``'s form; a search record whose ``searched_cells`` lacks ``reduce`` (written before
        unsearched cells were left out: its reduce list came from untouched initial weights) has no reduce cell."""
        try:
            searched = data.get("searched_cells")
            unsearched = data["reduce"] is None or (searched is not None and "reduce" not in searched)
            return cls(normal=tuple((str(op), int(src)) for op, src in data["normal"]),
                       normal_concat=tuple(int(i) for i in data["normal_concat"]),
                       reduce=None if unsearched else tuple((str(op), int(src)) for op, src in data["reduce"]),
                       reduce_concat=None if unsearched else tuple(int(i) for i in data["reduce_concat"]))
        except (KeyError, TypeError, ValueError) as error:
            raise GenotypeError(f"not a genotype: {error!r}; expected keys normal, normal_concat, reduce, reduce_concat") from None

    @classmethod
    def from_json(cls, text: str) -> "Genotype":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as error:
            raise GenotypeError(f"genotype is not valid JSON: {error}") from None


def derive_cell(weights: torch.Tensor, steps: int, primitives: Sequence[str] = PRIMITIVES,
                edge_weights: torch.Tensor = None) -> Tuple[Edge, ...]:
    """The DARTS rule: per node, keep the two incoming edges whose strongest non-``none``
    operation weighs most, each with that operation.

    weights: (edges, K) softmax mixing weights; edge_weights: optional (edges,) edge-normalisation
    weights (PC-DARTS), multiplied in before ranking.
    """
    weights = weights.detach().cpu()
    if edge_weights is not None:
        weights = weights * edge_weights.detach().cpu().view(-1, 1)
    usable = [k for k, name in enumerate(primitives) if name != "none"]
    cell: List[Edge] = []
    start = 0
    for node in range(steps):
        count = node + 2
        block = weights[start:start + count]
        strength = block[:, usable].max(dim=1).values
        chosen = sorted(torch.argsort(strength, descending=True)[:2].tolist())
        for source in chosen:
            k = usable[int(block[source, usable].argmax())]
            cell.append((primitives[k], source))
        start += count
    return tuple(cell)


# Published cells (facts from the DARTS and PC-DARTS papers), usable by name.
NAMED: Dict[str, Genotype] = {
    "DARTS_V1": Genotype(
        normal=(("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
                ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)),
        normal_concat=(2, 3, 4, 5),
        reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)),
        reduce_concat=(2, 3, 4, 5)),
    "DARTS_V2": Genotype(
        normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)),
        normal_concat=(2, 3, 4, 5),
        reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
                ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)),
        reduce_concat=(2, 3, 4, 5)),
    "PC_DARTS": Genotype(
        normal=(("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
                ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)),
        normal_concat=(2, 3, 4, 5),
        reduce=(("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
                ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)),
        reduce_concat=(2, 3, 4, 5)),
}


def random_genotype(seed: int, steps: int = 4, primitives: Sequence[str] = PRIMITIVES) -> Genotype:
    """A cell drawn uniformly from the space the DARTS rule derives from: per node two distinct inputs
    among its predecessors and, for each, one operation other than ``none`` (NAS' random baseline)."""
    import random
    rng = random.Random(seed)
    ops = [op for op in primitives if op != "none"]
    cells = []
    for _ in range(2):
        edges = []
        for node in range(steps):
            for source in sorted(rng.sample(range(node + 2), 2)):
                edges.append((rng.choice(ops), source))
        cells.append(tuple(edges))
    concat = tuple(range(2, steps + 2))
    return Genotype(cells[0], concat, cells[1], concat)
