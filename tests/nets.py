"""Small networks built for the tests (random weights, eval-mode batch norm with random statistics)."""
from __future__ import annotations

import torch
import torch.nn as nn

from certnas.space.ops import OPS, PRIMITIVES, GlobalAvgPool
from certnas.space.supernet import MixedOp


def randomise_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(c, generator=generator) * 0.5 + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.data.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)


class OpNet(nn.Module):
    """stem conv + BN, one operation (or a mixed op over all of them), ReLU, global pooling, linear."""

    def __init__(self, op: str, stride: int, channels: int = 4, in_channels: int = 1, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.mixed = op == "mixed"
        if self.mixed:
            self.op = MixedOp(channels, stride, PRIMITIVES, affine=True)
            self.arch = nn.Parameter(torch.randn(1, len(PRIMITIVES)))
        else:
            self.op = OPS[op](channels, stride, True)
        self.relu = nn.ReLU()
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.op(h, torch.softmax(self.arch, dim=-1)[0]) if self.mixed else self.op(h)
        return self.head(self.pool(self.relu(h)))


def op_net(op: str, stride: int, seed: int = 0, **kwargs) -> OpNet:
    torch.manual_seed(seed)
    net = OpNet(op, stride, **kwargs)
    with torch.no_grad():
        randomise_batch_norm(net, torch.Generator().manual_seed(seed))
    return net.eval()
