"""The PC-DARTS operations, written so that every bound method's bounds on them are sound.

Each constructor takes ``(C, stride, affine)`` and returns a module mapping ``(B, C, H, W)`` to
``(B, C, H / stride, W / stride)`` (stride 2 needs even ``H`` and ``W``).

Forward values equal the standard DARTS definitions. The pooling operations are *written
differently* because auto_LiRPA 0.3 bounds the native layers wrongly or not at all:

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

from functools import lru_cache
from typing import Callable, Dict, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

OpConstructor = Callable[[int, int, bool], nn.Module]


def _check_even(x: torch.Tensor, what: str) -> None:
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if height % 2 or width % 2:
        raise ValueError(f"{what} with stride 2 needs even height and width, got {height}x{width}")


@lru_cache(maxsize=None)
def _window_counts(size: int, stride: int) -> np.ndarray:
    """Number of in-image positions of a width-3, padding-1 window at each output position."""
    centres = np.arange(0, size, stride)
    return (np.minimum(centres + 1, size - 1) - np.maximum(centres - 1, 0) + 1).astype(np.float32)


@lru_cache(maxsize=None)
def _valid_neighbour(size: int, stride: int, offset: int) -> np.ndarray:
    """1.0 where the neighbour at ``centre + offset`` lies inside ``[0, size)``, else 0.0."""
    neighbours = np.arange(0, size, stride) + offset
    return ((neighbours >= 0) & (neighbours < size)).astype(np.float32)


def _constant(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    # Built from numpy so that tracing records a constant, not a computation on the input.
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=like.device, dtype=like.dtype)


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


class Zero(nn.Module):
    """The ``none`` operation: zeros of shape ``(B, C, H / stride, W / stride)``."""

    is_affine = True  # a fixed linear map: exact MILP encoding (verifiers.milp)

    def __init__(self, C: int, stride: int):
        super().__init__()
        self.stride = stride
        self.register_buffer("zero_kernel", torch.zeros(C, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            _check_even(x, "none")
        return F.conv2d(x, self.zero_kernel, stride=self.stride, groups=x.shape[1])


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


class AvgPool3x3(nn.Module):
    """3x3 average pooling, padding 1, padded pixels excluded from the average
    (``nn.AvgPool2d(3, stride, 1, count_include_pad=False)``), as a fixed convolution and a
    constant per-position rescale."""

    is_affine = True  # a fixed linear map: exact MILP encoding (verifiers.milp)

    def __init__(self, C: int, stride: int):
        super().__init__()
        self.stride = stride
        self.register_buffer("ones_kernel", torch.ones(C, 1, 3, 3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            _check_even(x, "avg_pool_3x3")
        height, width = int(x.shape[-2]), int(x.shape[-1])
        window_sum = F.conv2d(x, self.ones_kernel, stride=self.stride, padding=1, groups=x.shape[1])
        counts = np.outer(_window_counts(height, self.stride), _window_counts(width, self.stride))
        return window_sum * _constant(1.0 / counts, x)


class MaxPool3x3(nn.Module):
    """3x3 max pooling, padding 1, padding excluded (``nn.MaxPool2d(3, stride, 1)``), as a
    separable max of shifted copies built from fixed convolutions, constant masks and ReLU."""

    def __init__(self, C: int, stride: int):
        super().__init__()
        self.stride = stride
        # Row kernels (1x3) for the width pass; transposed (3x1) for the height pass.
        centre = torch.tensor([0.0, 1.0, 0.0])
        minus_left = torch.tensor([1.0, -1.0, 0.0])   # x[j - 1] - x[j]
        minus_right = torch.tensor([0.0, -1.0, 1.0])  # x[j + 1] - x[j]
        row = torch.stack([centre, minus_left, minus_right]).view(3, 1, 1, 1, 3).repeat(1, C, 1, 1, 1)
        self.register_buffer("row_kernels", row, persistent=False)
        self.register_buffer("column_kernels", row.transpose(-1, -2).contiguous(), persistent=False)

    def _max3(self, x: torch.Tensor, kernels: torch.Tensor, stride: tuple, padding: tuple,
              size: int, axis: int) -> torch.Tensor:
        groups = x.shape[1]
        step = stride[axis]
        centre = F.conv2d(x, kernels[0], stride=stride, padding=padding, groups=groups)
        to_left = F.conv2d(x, kernels[1], stride=stride, padding=padding, groups=groups)
        to_right = F.conv2d(x, kernels[2], stride=stride, padding=padding, groups=groups)
        shape = (1, 1, -1, 1) if axis == 0 else (1, 1, 1, -1)
        # An out-of-image neighbour counts as the centre: its difference is masked to zero.
        to_left = to_left * _constant(_valid_neighbour(size, step, -1).reshape(shape), x)
        to_right = to_right * _constant(_valid_neighbour(size, step, +1).reshape(shape), x)
        best = centre + F.relu(to_left)
        return best + F.relu(centre + to_right - best)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            _check_even(x, "max_pool_3x3")
        height, width = int(x.shape[-2]), int(x.shape[-1])
        s = self.stride
        x = self._max3(x, self.row_kernels, (1, s), (0, 1), width, axis=1)
        return self._max3(x, self.column_kernels, (s, 1), (1, 0), height, axis=0)


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2, 2)`` as two strided selections per axis and ``a + relu(b - a)``."""

    def __init__(self, C: int):
        super().__init__()
        first = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2).repeat(C, 1, 1, 1)
        second = torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).repeat(C, 1, 1, 1)  # x[j + 1] - x[j]
        self.register_buffer("row_first", first, persistent=False)
        self.register_buffer("row_step", second, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_even(x, "MaxPool2x2")
        groups = x.shape[1]
        x = F.conv2d(x, self.row_first, stride=(1, 2), groups=groups) + F.relu(
            F.conv2d(x, self.row_step, stride=(1, 2), groups=groups))
        col_first, col_step = self.row_first.transpose(-1, -2), self.row_step.transpose(-1, -2)
        return F.conv2d(x, col_first, stride=(2, 1), groups=groups) + F.relu(
            F.conv2d(x, col_step, stride=(2, 1), groups=groups))


class ChannelMap(nn.Module):
    """A fixed 0/1 channel map ``out[o] = x[source[o]]`` (selection, scatter, permutation) as a 1x1
    convolution; ``source[o] = -1`` leaves output channel o at zero."""

    is_affine = True  # a fixed linear map: exact MILP encoding (verifiers.milp)

    def __init__(self, in_channels: int, source: list):
        super().__init__()
        weight = torch.zeros(len(source), in_channels, 1, 1)
        for out, index in enumerate(source):
            if index >= 0:
                weight[out, index] = 1.0
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight)


class GlobalAvgPool(nn.Module):
    """Mean over H and W, ``(B, C, H, W) -> (B, C)``, as a fixed depthwise convolution."""

    is_affine = True  # a fixed linear map: exact MILP encoding (verifiers.milp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, height, width = int(x.shape[1]), int(x.shape[-2]), int(x.shape[-1])
        kernel = np.full((channels, 1, height, width), 1.0 / (height * width), dtype=np.float32)
        return F.conv2d(x, _constant(kernel, x), groups=channels).flatten(1)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the model's first layer (a fixed affine map)."""

    is_affine = True  # exact MILP encoding (verifiers.milp)

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).expand(channels).reshape(1, channels, 1, 1).clone()
        std = torch.as_tensor(std, dtype=torch.float32).expand(channels).reshape(1, channels, 1, 1).clone()
        if (std <= 0).any():
            raise ValueError(f"std must be positive, got {std.flatten().tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("inv_std", 1.0 / std)
        # derived from mean and std (the network's configuration), so not saved twice
        self.register_buffer("kernel", (1.0 / std).reshape(channels, 1, 1, 1), persistent=False)
        self.register_buffer("shift", -(mean / std).reshape(channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A depthwise 1x1 convolution, not (x - mean) * inv_std: auto_LiRPA 0.3 bounds an L2 input
        # ball soundly only through a first linear layer (see verifiers.bounds._check_l2_input_path).
        # The kernel and bias are buffers, not computed here: a reshape of a buffer inside forward is
        # a graph node without bounds, which full CROWN cannot back-substitute through.
        return F.conv2d(x, self.kernel, self.shift, groups=self.kernel.shape[0])


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
