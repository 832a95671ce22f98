"""Networks that are trained and verified: the DARTS evaluation network built from a genotype, and
a plain ReLU MLP (small enough for exact MILP verification).

``NetworkConfig`` describes a network completely (it is what a model file stores); ``build_network``
makes it. Every network maps ``(B, C, H, W)`` pixels in [0, 1] to ``(B, K)`` logits and normalises
its input in its first layer, so every eps is in pixel units.

Drop-path and the auxiliary head act only in training mode: a network in eval mode (as it is when
bounded, attacked or verified) is a fixed function of its input.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from certnas.space.genotype import Genotype, GenotypeError
from certnas.space.ops import OPS, FactorizedReduce, GlobalAvgPool, GridAvgPool, Identity, Normalize, ReLUConvBN


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero each sample's branch with probability ``drop_prob``, rescaling the kept ones."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask / keep


class Cell(nn.Module):
    """A discrete DARTS cell: two inputs preprocessed to C channels, two operations per node, the
    ``concat`` nodes concatenated along channels. Reduction cells apply stride 2 to edges that read
    the cell inputs."""

    def __init__(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
                 reduction_prev: bool, affine: bool = True):
        super().__init__()
        edges, concat = (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(C_prev_prev, C, affine) if reduction_prev
                            else ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine))
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine)
        self.ops = nn.ModuleList(OPS[name](C, 2 if reduction and source < 2 else 1, affine) for name, source in edges)
        self.sources = tuple(source for _, source in edges)
        self.concat = tuple(concat)
        self.steps = len(edges) // 2
        if not self.concat or max(self.concat) >= 2 + self.steps:
            raise GenotypeError(f"concat {self.concat} names nodes beyond the {2 + self.steps} of the cell")

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(self.steps):
            total = None
            for k in (2 * node, 2 * node + 1):
                h = self.ops[k](states[self.sources[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], Identity):
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """Auxiliary classifier on the cell at 2/3 of the depth (training only): ReLU, 1x1 conv to 128
    channels, BN, ReLU, global average pooling, linear. (DARTS' head pools to a fixed 2x2 grid,
    which assumes 8x8 inputs; global pooling works for any size.)"""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.ReLU(), nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
                                      GlobalAvgPool())
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


STEMS = ("cifar", "strided", "imagenet")


def is_reduction(i: int, layers: int) -> bool:
    """Whether cell ``i`` of ``layers`` is a reduction cell (DARTS: at 1/3 and 2/3 of the depth)."""
    return layers >= 3 and i in (layers // 3, 2 * layers // 3)


def _stem_size(image_size: int, stem: str) -> int:
    """Side of the maps the first cell gets (stride-2 convolutions with padding round odd sizes up)."""
    size = image_size
    for _ in range({"cifar": 0, "strided": 1, "imagenet": 3}.get(stem, 0)):
        size = (size + 1) // 2
    return size


def odd_reduction(image_size: int, layers: int, stem: str) -> Optional[str]:
    """None if every reduction cell of this network gets even-sized maps (stride-2 pooling needs
    them), else which cell does not and at what size."""
    size = _stem_size(image_size, stem)
    for i in range(layers):
        if is_reduction(i, layers):
            if size % 2:
                return f"cell {i} (a reduction cell) would get {size}x{size} maps"
            size //= 2
    return None


def final_map_size(image_size: int, layers: int, stem: str) -> int:
    """Side of the last cell's output maps."""
    return _stem_size(image_size, stem) // 2 ** sum(is_reduction(i, layers) for i in range(layers))


def imagenet_stems(in_channels: int, C: int) -> Tuple[nn.Module, nn.Module]:
    """DARTS' ImageNet stems: three stride-2 3x3 convolutions (8x smaller maps) before the first
    cell; the first gives the cell's s0, the second its s1."""
    stem0 = nn.Sequential(nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2),
                          nn.ReLU(), nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
    stem1 = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
    return stem0, stem1


class DartsNetwork(nn.Module):
    """Stem, ``layers`` cells from ``genotype`` (reductions at 1/3 and 2/3 of the depth), global
    average pooling (``head_grid`` 1, DARTS' head; or means over a ``head_grid`` x ``head_grid`` grid of
    the last map, which keeps where a feature is), linear. ``stem``: ``cifar`` (one 3x3 convolution, full resolution),
    ``strided`` (the same convolution with stride 2: the cells see half the resolution, a quarter of
    the cost; 28x28 digits enter them at 14x14) or ``imagenet`` (:func:`imagenet_stems`, for large
    images). ``drop_path_prob`` (set by the trainer) and the auxiliary head are used
    in training mode only; ``forward`` always returns the main logits."""

    def __init__(self, genotype: Genotype, C: int, num_classes: int, layers: int, in_channels: int,
                 mean, std, auxiliary: bool = False, stem_multiplier: int = 3, affine: bool = True,
                 stem: str = "cifar", head_grid: int = 1):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
        self.drop_path_prob = 0.0
        self.normalize = Normalize(mean, std, in_channels)
        if stem in ("cifar", "strided"):
            C_stem = stem_multiplier * C
            self.stem = nn.Sequential(nn.Conv2d(in_channels, C_stem, 3, stride=2 if stem == "strided" else 1, padding=1,
                                                bias=False), nn.BatchNorm2d(C_stem))
            self.stem1 = None
        else:
            C_stem = C
            self.stem, self.stem1 = imagenet_stems(in_channels, C)
        C_prev_prev, C_prev, C_curr = C_stem, C_stem, C
        needed = [i for i in range(layers) if is_reduction(i, layers)]
        if needed and genotype.reduce is None:
            raise GenotypeError(f"the genotype has no searched reduction cell (its search had fewer than 3 cells), and "
                                f"a network of {layers} cells has one at cell{'s' if len(needed) > 1 else ''} "
                                f"{', '.join(map(str, needed))}: train with --layers 2 or fewer, or search with "
                                f"--layers 3 or more")
        self.cells = nn.ModuleList()
        self.auxiliary_index = 2 * layers // 3 if auxiliary else -1
        self.auxiliary_head = None
        reduction_prev = stem == "imagenet"
        for i in range(layers):
            reduction = is_reduction(i, layers)
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, affine)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, len(cell.concat) * C_curr
            if i == self.auxiliary_index:
                self.auxiliary_head = AuxiliaryHead(C_prev, num_classes)
        self.pool = GlobalAvgPool() if head_grid == 1 else GridAvgPool(head_grid)
        self.classifier = nn.Linear(C_prev * head_grid ** 2, num_classes)

    def forward_with_aux(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(logits, auxiliary logits)``; the second is None in eval mode or without a head."""
        s0 = s1 = self.stem(self.normalize(x))
        if self.stem1 is not None:
            s1 = self.stem1(s0)
        aux = None
        drop = self.drop_path_prob if self.training else 0.0
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop)
            if i == self.auxiliary_index and self.training:
                aux = self.auxiliary_head(s1)
        return self.classifier(self.pool(s1)), aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aux(x)[0]


@dataclass(frozen=True)
class NetworkConfig:
    """Everything needed to rebuild a network. kind: ``darts`` (genotype, layers, init_channels,
    auxiliary, stem, head_grid), ``mlp`` (hidden widths) or ``cnn`` (convs: (channels, kernel, stride) per
    convolution, padding (kernel - 1) // 2, then the hidden widths of the fully connected layers)."""
    kind: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    genotype: Optional[Dict[str, Any]] = None
    layers: int = 8
    init_channels: int = 16
    auxiliary: bool = False
    hidden: Tuple[int, ...] = field(default_factory=tuple)
    stem: str = "cifar"
    head_grid: int = 1
    convs: Tuple[Tuple[int, int, int], ...] = field(default_factory=tuple)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "NetworkConfig":
        from certnas.config import from_dict
        config = from_dict(cls, data)
        return cls(**{**asdict(config), "mean": tuple(config.mean), "std": tuple(config.std),
                      "hidden": tuple(int(h) for h in config.hidden),
                      "convs": tuple(tuple(int(v) for v in c) for c in config.convs)})


def build_network(config: NetworkConfig) -> nn.Module:
    """The (untrained) network a ``NetworkConfig`` describes."""
    if config.kind == "darts":
        if config.genotype is None:
            raise GenotypeError("a darts network needs a genotype")
        genotype = Genotype.from_dict(config.genotype)
        return DartsNetwork(genotype, config.init_channels, config.num_classes, config.layers, config.in_channels,
                            config.mean, config.std, auxiliary=config.auxiliary, stem=config.stem,
                            head_grid=config.head_grid)
    if config.kind == "mlp":
        if not config.hidden:
            raise ValueError("an mlp needs at least one hidden layer")
        layers = [Normalize(config.mean, config.std, config.in_channels), nn.Flatten()]
        width = config.in_channels * config.image_size ** 2
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, config.num_classes))
        return nn.Sequential(*layers)
    if config.kind == "cnn":
        if not config.convs:
            raise ValueError("a cnn needs at least one convolution")
        layers = [Normalize(config.mean, config.std, config.in_channels)]
        channels, size = config.in_channels, config.image_size
        for out, kernel, stride in config.convs:
            padding = (kernel - 1) // 2
            layers += [nn.Conv2d(channels, out, kernel, stride, padding), nn.ReLU()]
            channels, size = out, (size + 2 * padding - kernel) // stride + 1
            if size < 1:
                raise ValueError(f"the convolutions {config.convs} shrink {config.image_size}x{config.image_size} "
                                 "images to nothing")
        layers.append(nn.Flatten())
        width = channels * size * size
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, config.num_classes))
        return nn.Sequential(*layers)
    raise ValueError(f"unknown network kind {config.kind!r}; known: darts, mlp, cnn")
