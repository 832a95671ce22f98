"""Small networks for the tests of ``verifiers`` (random weights, eval-mode batch norm with random statistics),
built here from torch and ``verifiers.layers`` only: the library is tested without certnas.

The operations are the kinds a NAS cell is made of: separable (depthwise + pointwise) and dilated
depthwise convolutions, the sound pooling layers, native pooling (rewritten by ``verifiers.rewrite``),
a zero map, a strided 1x1 convolution, and ``mixed``: a softmax-weighted sum of all of them.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn

from verifiers import layers


def _dil(C: int, kernel: int, stride: int, padding: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, kernel, stride, padding, dilation=dilation, groups=C, bias=False),
                         nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C))


def _sep(C: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_dil(C, kernel, stride, kernel // 2, 1), _dil(C, kernel, 1, kernel // 2, 1))


def _skip(C: int, stride: int) -> nn.Module:
    return nn.Identity() if stride == 1 else nn.Sequential(nn.Conv2d(C, C, 1, stride, bias=False), nn.BatchNorm2d(C))


OPS: Dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda C, s: layers.Zero(C, s),
    "avg_pool_3x3": lambda C, s: layers.AvgPool3x3(C, s),
    "max_pool_3x3": lambda C, s: layers.MaxPool3x3(C, s),
    "avg_pool_native": lambda C, s: nn.AvgPool2d(3, s, 1, count_include_pad=False),  # rewritten soundly
    "max_pool_native": lambda C, s: nn.MaxPool2d(3, s, 1),  # rewritten soundly
    "skip_connect": _skip,
    "sep_conv_3x3": lambda C, s: _sep(C, 3, s),
    "sep_conv_5x5": lambda C, s: _sep(C, 5, s),
    "dil_conv_3x3": lambda C, s: _dil(C, 3, s, 2, 2),
    "dil_conv_5x5": lambda C, s: _dil(C, 5, s, 4, 2),
}
OPERATIONS = tuple(OPS)


def randomise_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(c, generator=generator) * 0.5 + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.data.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)


class Mixed(nn.Module):
    """``sum_i w_i op_i(x)`` over every operation, the weights given to forward."""

    def __init__(self, C: int, stride: int):
        super().__init__()
        self.ops = nn.ModuleList(OPS[name](C, stride) for name in OPERATIONS)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class OpNet(nn.Module):
    """stem conv + BN, one operation (or the mixed one, weighted by softmax(arch)), ReLU, global pooling, linear."""

    def __init__(self, op: str, stride: int, channels: int = 4, in_channels: int = 1, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.mixed = op == "mixed"
        if self.mixed:
            self.op, count = self.mixed_operation(channels, stride)
            self.arch = nn.Parameter(torch.randn(1, count))
        else:
            self.op = self.operation(op, channels, stride)
        self.relu = nn.ReLU()
        self.pool = layers.GlobalAvgPool()
        self.head = nn.Linear(channels, classes)

    @staticmethod
    def operation(op: str, channels: int, stride: int) -> nn.Module:
        return OPS[op](channels, stride)

    @staticmethod
    def mixed_operation(channels: int, stride: int):
        return Mixed(channels, stride), len(OPERATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.op(h, torch.softmax(self.arch, dim=-1)[0]) if self.mixed else self.op(h)
        return self.head(self.pool(self.relu(h)))


def op_net(op: str, stride: int, seed: int = 0, network: type = OpNet, **kwargs) -> OpNet:
    torch.manual_seed(seed)
    net = network(op, stride, **kwargs)
    with torch.no_grad():
        randomise_batch_norm(net, torch.Generator().manual_seed(seed))
    return net.eval()


class CellNet(nn.Module):
    """A cell-shaped network: normalisation, a stem, two nodes each summing two operations of earlier
    states (one state feeds several operations), the nodes concatenated, a strided reduction, pooling,
    linear: the graph patterns of a NAS cell, built without certnas."""

    def __init__(self, ops=("sep_conv_3x3", "skip_connect", "dil_conv_3x3", "max_pool_3x3"), channels: int = 4,
                 in_channels: int = 1, classes: int = 10):
        super().__init__()
        self.normalize = layers.Normalize((0.3,) * in_channels, (0.2,) * in_channels, in_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.node0 = nn.ModuleList([OPS[ops[0]](channels, 1), OPS[ops[1]](channels, 1)])
        self.node1 = nn.ModuleList([OPS[ops[2]](channels, 1), OPS[ops[3]](channels, 1)])
        self.reduce = nn.Sequential(nn.ReLU(), nn.Conv2d(2 * channels, channels, 3, 2, 1, bias=False),
                                    nn.BatchNorm2d(channels))
        self.pool = layers.GlobalAvgPool()
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem(self.normalize(x))
        n0 = self.node0[0](s0) + self.node0[1](s0)
        n1 = self.node1[0](n0) + self.node1[1](s0)
        return self.head(self.pool(torch.relu(self.reduce(torch.cat([n0, n1], dim=1)))))


def cell_net(seed: int = 0, **kwargs) -> CellNet:
    torch.manual_seed(seed)
    net = CellNet(**kwargs)
    with torch.no_grad():
        randomise_batch_norm(net, torch.Generator().manual_seed(seed))
    return net.eval()
