"""The PC-DARTS operations, written so that every bound method's bounds on them are sound.

Each constructor takes ``(C, stride, affine)`` and returns a module mapping ``(B, C, H, W)`` to
``(B, C, H / stride, W / stride)`` (stride 2 needs even ``H`` and ``W``).

Forward values equal the standard DARTS definitions. The pooling operations are *written
differently* (in ``verifiers.layers``) because auto_LiRPA 0.3 bounds the native layers wrongly or not at all:

- ``avg_pool_3x3`` (count_include_pad=False) is a fixed all-ones depthwise convolution followed by
  an elementwise product with a constant map of ``1 / (number of in-image pixels in the window)``.
  Both pieces are linear, so every method bounds them exactly.
- ``max_pool_3x3`` is a separable max: along the width then along the height, each a max of three
  shifted copies computed as ``max(a, b) = a + relu(b - a)``. Out-of-image neighbours are replaced by
  the window centre (always in the window), which equals excluding them, as ``nn.MaxPool2d`` does
  with its ``-inf`` padding. The shifts are fixed convolutions and constant masks; the only
  nonlinearity is ReLU, which every method relaxes soundly.
- ``none`` is a fixed all-zero depthwise convolution (exactly zero, trivially bounded).
- ``skip_connect`` at stride 2 is DARTS' factorized reduce; its "shift by one pixel" is a fixed
  selecting convolution instead of a slice.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

# the sound layers live in verifiers.layers; re-exported here for the networks of certnas.space
from verifiers.layers import (AvgPool3x3, ChannelMap, GlobalAvgPool, GridAvgPool, MaxPool2x2, MaxPool3x3,  # noqa: F401
                              Normalize, Zero, _check_even)

OpConstructor = Callable[[int, int, bool], nn.Module]


class ReLUConvBN(nn.Sequential):
    """ReLU, convolution, batch norm: DARTS' preprocessing block."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU, dilated depthwise convolution, pointwise convolution, batch norm."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 dilation: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, dilation=dilation,
                      groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked DilConv blocks with dilation 1; the stride is in the first."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 affine: bool = True):
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine),
        )


class Identity(nn.Module):
    """``skip_connect`` at stride 1."""

    is_affine = True  # a fixed linear map: exact MILP encoding (verifiers.milp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FactorizedReduce(nn.Module):
    """DARTS' factorized reduce: ReLU, two 1x1 stride-2 convolutions on the input and on the input
    shifted by one pixel, concatenated, then batch norm. Needs even H and W."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=1, bias=False)
        shift = torch.zeros(C_in, 1, 2, 2)
        shift[:, :, 1, 1] = 1.0  # picks x[2i + 1, 2j + 1], i.e. x[:, :, 1:, 1:] at stride 2
        self.register_buffer("shift_kernel", shift, persistent=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_even(x, "FactorizedReduce")
        x = self.relu(x)
        shifted = F.conv2d(x, self.shift_kernel, stride=2, groups=x.shape[1])
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))




OPS: Dict[str, OpConstructor] = {
    "none": lambda C, stride, affine: Zero(C, stride),
    "avg_pool_3x3": lambda C, stride, affine: AvgPool3x3(C, stride),
    "max_pool_3x3": lambda C, stride, affine: MaxPool3x3(C, stride),
    "skip_connect": lambda C, stride, affine: (
        Identity() if stride == 1 else FactorizedReduce(C, C, affine)),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
}

PRIMITIVES = tuple(OPS)
