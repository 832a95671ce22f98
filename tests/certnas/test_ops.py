"""Each operation computes exactly what the standard DARTS definition computes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from certnas.space import OPS, PRIMITIVES, MixedOp
from certnas.space.ops import FactorizedReduce, GlobalAvgPool


def _x(size=8, channels=3):
    x = torch.randn(2, channels, size, size)
    x[0, 0] = -5.0  # all-negative channel: zero padding would change max pooling
    return x


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 6])
def test_avg_pool_matches_torch_excluding_padding(stride, size):
    x = _x(size)
    reference = nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    assert torch.allclose(OPS["avg_pool_3x3"](3, stride, False)(x), reference(x), atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 6])
def test_max_pool_matches_torch(stride, size):
    x = _x(size)
    assert torch.allclose(OPS["max_pool_3x3"](3, stride, False)(x), nn.MaxPool2d(3, stride, 1)(x), atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
def test_none_is_zero_of_the_right_shape(stride):
    out = OPS["none"](3, stride, False)(_x())
    assert out.shape == (2, 3, 8 // stride, 8 // stride) and (out == 0).all()


def test_skip_connect_is_identity_at_stride_one_and_factorized_reduce_at_two():
    x = _x()
    assert torch.equal(OPS["skip_connect"](3, 1, False)(x), x)
    op = OPS["skip_connect"](4, 2, True).eval()
    assert isinstance(op, FactorizedReduce)
    x = torch.randn(2, 4, 8, 8)
    h = F.relu(x)
    reference = op.bn(torch.cat([op.conv_1(h), F.conv2d(h[:, :, 1:, 1:], op.conv_2.weight, stride=2)], dim=1))
    assert torch.allclose(op(x), reference, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in PRIMITIVES if "conv" in n])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_ops_keep_channels_and_divide_size_by_stride(name, stride):
    assert OPS[name](3, stride, True)(_x()).shape == (2, 3, 8 // stride, 8 // stride)


@pytest.mark.parametrize("name", ["avg_pool_3x3", "max_pool_3x3", "none", "skip_connect"])
def test_stride_two_on_odd_size_is_refused(name):
    with pytest.raises(ValueError, match="even height and width"):
        OPS[name](4, 2, False)(torch.randn(1, 4, 7, 7))


def test_mixed_op_is_the_weighted_sum_of_its_ops():
    mixed = MixedOp(3, 1, PRIMITIVES, affine=False).eval()
    weights = torch.softmax(torch.randn(len(PRIMITIVES)), 0)
    x = _x()
    expected = sum(w * op(x) for w, op in zip(weights, mixed.ops))
    assert torch.allclose(mixed(x, weights), expected, atol=1e-6)


def test_global_avg_pool_is_the_spatial_mean():
    x = _x()
    assert torch.allclose(GlobalAvgPool()(x), x.mean(dim=(2, 3)), atol=1e-6)
