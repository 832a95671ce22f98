"""Layers whose bounds are sound under every method of ``verifiers``, for networks built to be verified.

auto_LiRPA 0.3 bounds some native layers wrongly or not at all: padded average pooling (unsound CROWN),
stride-1 max pooling (refused), adaptive pooling, and ``(x - mean) / std`` on an L2 ball (unsound IBP).
The layers here compute the same values from operations every method bounds soundly: fixed
convolutions (depthwise where possible), products with constant masks, additions and ReLU.

- ``AvgPool2d`` / ``AvgPool3x3``: an all-ones depthwise convolution times a constant map of
  ``1 / (window size)`` (``count_include_pad``) or ``1 / (in-image pixels in the window)``.
- ``MaxPool2d`` / ``MaxPool3x3`` / ``MaxPool2x2``: a separable max, along the width then the height,
  each a chain of ``max(a, b) = a + relu(b - a)`` over shifted copies taken by fixed one-hot
  convolutions; a window position outside the image adds a difference masked to zero, which equals
  excluding it (native max pooling pads with ``-inf``).
- ``GlobalAvgPool``, ``GridAvgPool``, ``ChannelMap``, ``ChannelAffine``, ``Normalize``, ``Zero``: fixed linear maps.

``verifiers.rewrite.make_sound`` replaces a user's native layers by these automatically.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
        # at stride 1 the centre selection is the identity: no convolution, so no node for the bound
        # to back-substitute through (a stride-2 selection stays a convolution, which bounds in patches)
        centre = x if step == 1 else F.conv2d(x, kernels[0], stride=stride, padding=padding, groups=groups)
        to_left = F.conv2d(x, kernels[1], stride=stride, padding=padding, groups=groups)
        to_right = F.conv2d(x, kernels[2], stride=stride, padding=padding, groups=groups)
        shape = (1, 1, -1, 1) if axis == 0 else (1, 1, 1, -1)
        # An out-of-image neighbour counts as the centre: its difference is masked to zero. The left
        # mask m (0 or 1) is applied after the ReLU, relu(m z) = m relu(z): the ReLU's input is then a
        # convolution, whose CROWN intermediate bound auto_LiRPA computes in patches mode; with the
        # mask first it started from a dense identity over every neuron (on 28x28 maps, about 15x
        # slower per max pool; measured in the README's sound-operations section).
        left_mask = _constant(_valid_neighbour(size, step, -1).reshape(shape), x)
        to_right = to_right * _constant(_valid_neighbour(size, step, +1).reshape(shape), x)
        best = centre + F.relu(to_left) * left_mask
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


class GridAvgPool(nn.Module):
    """Means over a ``grid`` x ``grid`` partition of the map, flattened channel-major,
    ``(B, C, H, W) -> (B, C * grid * grid)``, as a fixed strided depthwise convolution; H and W must be
    multiples of ``grid``. ``grid=1`` is :class:`GlobalAvgPool`."""

    is_affine = True  # a fixed linear map: exact MILP encoding (verifiers.milp)

    def __init__(self, grid: int):
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be at least 1, got {grid}")
        self.grid = int(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, height, width = int(x.shape[1]), int(x.shape[-2]), int(x.shape[-1])
        if height % self.grid or width % self.grid:
            raise ValueError(f"a {height}x{width} map does not split into a {self.grid}x{self.grid} grid")
        window = (height // self.grid, width // self.grid)
        kernel = np.full((channels, 1) + window, 1.0 / (window[0] * window[1]), dtype=np.float32)
        return F.conv2d(x, _constant(kernel, x), stride=window, groups=channels).flatten(1)


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


IntPair = Union[int, Tuple[int, int], Sequence[int]]


def _pair(value: IntPair) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


@lru_cache(maxsize=None)
def _window_positions(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> np.ndarray:
    """(outputs, kernel) bool: whether tap t of output window j lies inside ``[0, size)``."""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    taps = np.arange(outputs)[:, None] * stride - padding + np.arange(kernel)[None, :] * dilation
    return (taps >= 0) & (taps < size)


class AvgPool2d(nn.Module):
    """``nn.AvgPool2d(kernel, stride, padding, count_include_pad=..., divisor_override=...)`` (floor mode)
    as an all-ones depthwise convolution and a constant per-position rescale."""

    is_affine = True  # a fixed linear map: exact MILP encoding (verifiers.milp)

    def __init__(self, kernel_size: IntPair, stride: IntPair = None, padding: IntPair = 0,
                 count_include_pad: bool = True, divisor_override: int = None):
        super().__init__()
        self.kernel = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, height, width = int(x.shape[1]), int(x.shape[-2]), int(x.shape[-1])
        kernel = np.ones((channels, 1) + self.kernel, dtype=np.float32)
        window_sum = F.conv2d(x, _constant(kernel, x), stride=self.stride, padding=self.padding, groups=channels)
        if self.divisor_override:
            return window_sum * (1.0 / self.divisor_override)
        rows = _window_positions(height, self.kernel[0], self.stride[0], self.padding[0])
        cols = _window_positions(width, self.kernel[1], self.stride[1], self.padding[1])
        if self.count_include_pad:
            # native pooling counts padding but not taps beyond it (possible when the window overhangs)
            rows = _window_positions(height + 2 * self.padding[0], self.kernel[0], self.stride[0], 0)
            cols = _window_positions(width + 2 * self.padding[1], self.kernel[1], self.stride[1], 0)
        counts = np.outer(rows.sum(1), cols.sum(1)).astype(np.float32)
        return window_sum * _constant(1.0 / counts, x)


class MaxPool2d(nn.Module):
    """``nn.MaxPool2d(kernel, stride, padding, dilation)`` (floor mode) as a separable max of shifted
    copies: fixed one-hot depthwise convolutions, constant masks, additions and ReLU."""

    def __init__(self, kernel_size: IntPair, stride: IntPair = None, padding: IntPair = 0, dilation: IntPair = 1):
        super().__init__()
        self.kernel = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)

    def _max_along(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """Max over the window along the width (axis 1) or the height (axis 0); the other axis untouched."""
        channels, size = int(x.shape[1]), int(x.shape[-1] if axis == 1 else x.shape[-2])
        kernel, stride, padding, dilation = (self.kernel[axis], self.stride[axis], self.padding[axis],
                                             self.dilation[axis])
        valid = _window_positions(size, kernel, stride, padding, dilation).astype(np.float32)  # (outputs, kernel)
        shape = (1, 1, 1, -1) if axis == 1 else (1, 1, -1, 1)
        conv_stride = (1, stride) if axis == 1 else (stride, 1)
        conv_padding = (0, padding) if axis == 1 else (padding, 0)
        conv_dilation = (1, dilation) if axis == 1 else (dilation, 1)

        def tap(t: int) -> torch.Tensor:
            one_hot = np.zeros((channels, 1, kernel), dtype=np.float32)
            one_hot[:, :, t] = 1.0
            one_hot = one_hot[:, :, None, :] if axis == 1 else one_hot[:, :, :, None]
            return F.conv2d(x, _constant(one_hot, x), stride=conv_stride, padding=conv_padding,
                            dilation=conv_dilation, groups=channels)

        # start from the first in-image tap of each window (a constant per-position choice), then
        # max(best, tap) = best + relu(tap - best) over every tap, masked to zero where it is padding
        first = valid.argmax(1)
        best = sum(tap(t) * _constant((first == t).astype(np.float32).reshape(shape), x)
                   for t in range(kernel) if (first == t).any())
        for t in range(kernel):
            if not valid[:, t].any():
                continue
            difference = tap(t) - best
            if not valid[:, t].all():
                difference = difference * _constant(valid[:, t].reshape(shape), x)
            best = best + F.relu(difference)
        return best

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._max_along(self._max_along(x, axis=1), axis=0)


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel of an image batch ``(B, C, H, W)``, as a depthwise 1x1 convolution
    (``scale`` and ``shift``: a number or C numbers)."""

    is_affine = True  # exact MILP encoding (verifiers.milp)

    def __init__(self, scale, shift, channels: int):
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32).flatten().expand(channels).clone()
        shift = torch.as_tensor(shift, dtype=torch.float32).flatten().expand(channels).clone()
        # the kernel and bias are buffers, not computed in forward: a reshape of a buffer there is a graph
        # node without bounds, which full CROWN cannot back-substitute through
        self.register_buffer("kernel", scale.reshape(channels, 1, 1, 1))
        self.register_buffer("bias", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, self.bias, groups=self.kernel.shape[0])
