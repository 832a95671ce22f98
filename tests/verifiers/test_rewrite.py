"""Native layers rewritten into sound ones (verifiers.layers, verifiers.rewrite): equal outputs, shared
parameters, the caller's model untouched, and sound bounds where the native layers were refused."""
import itertools
import math

import pytest
import torch
import torch.fx
import torch.nn as nn
import torchvision

from tests.violation import max_violation
from verifiers import layers
from verifiers.bounds import compute_bounds
from verifiers.errors import UnsupportedModelError
from verifiers.rewrite import make_sound, needs_rewrite

GRID = [(k, s, p, d) for k, s, p, d in itertools.product([1, 2, 3, 4, 5], [1, 2, 3], [0, 1, 2], [1, 2]) if p <= k // 2]


@pytest.mark.parametrize("size", [(5, 6), (8, 7)])
def test_sound_max_and_average_pooling_equal_the_native_layers(size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    checked = 0
    for kernel, stride, padding, dilation in GRID:
        try:
            expected = nn.MaxPool2d(kernel, stride, padding, dilation)(x)
        except RuntimeError:  # output size < 1
            continue
        assert torch.allclose(layers.MaxPool2d(kernel, stride, padding, dilation)(x), expected, atol=1e-6)
        if dilation == 1:
            for include in (True, False):
                expected = nn.AvgPool2d(kernel, stride, padding, count_include_pad=include)(x)
                assert torch.allclose(layers.AvgPool2d(kernel, stride, padding, include)(x), expected, atol=1e-6)
        checked += 1
    assert checked > 40


def _native_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(torchvision.transforms.Normalize((0.2,), (0.3,)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 2, 1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_make_sound_replaces_every_native_layer_keeps_outputs_and_shares_parameters():
    net = _native_net()
    x = torch.rand(3, 1, 8, 8)
    sound = make_sound(net, x)
    kinds = {type(m) for m in sound.modules()}
    assert not kinds & {nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, torchvision.transforms.Normalize}
    assert {type(m) for m in net.modules()} >= {nn.MaxPool2d, nn.AvgPool2d}  # the caller's model is untouched
    with torch.no_grad():
        assert torch.allclose(sound(x), net(x), atol=1e-6)
        net[1].weight.mul_(2)  # shared parameters: the copy follows the model
        assert torch.allclose(sound(x), net(x), atol=1e-6)
    assert not needs_rewrite(sound) and needs_rewrite(net)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
def test_native_layers_are_bounded_soundly_instead_of_refused(method, norm):
    net = _native_net(seed=1)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = 0.05 if norm == math.inf else 0.3
    lower, upper = compute_bounds(net, x, eps, norm=norm, method=method)
    tolerance = 1e-5 * (1 + max(lower.abs().max().item(), upper.abs().max().item()))
    assert max_violation(net, x, eps, norm, lower.detach(), upper.detach(), samples=48, pgd_steps=25) <= tolerance
    assert any(isinstance(m, nn.MaxPool2d) for m in net.modules())


class _Normalised(nn.Module):
    """(x - mean) / std written as arithmetic, then a small CNN: the form ONNX files carry."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.1, 0.2]).view(1, 2, 1, 1))
        self.register_buffer("std", torch.tensor([0.3, 0.4]).view(1, 2, 1, 1))
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        h = (x - self.mean) / self.std
        return self.head(torch.relu(self.conv(h * 2.0 + 1.0)).flatten(1))


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_constant_arithmetic_in_an_fx_graph_becomes_a_sound_affine_layer(method):
    torch.manual_seed(0)
    traced = torch.fx.symbolic_trace(_Normalised().eval())
    x = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    sound = make_sound(traced, x)
    assert sum(isinstance(m, layers.ChannelAffine) for m in sound.modules()) == 4
    # the division alone was refused by the L2 check before; now the L2 ball enters a convolution first
    lower, upper = compute_bounds(traced, x, 0.3, norm=2.0, method=method)
    tolerance = 1e-5 * (1 + max(lower.abs().max().item(), upper.abs().max().item()))
    assert max_violation(traced, x, 0.3, 2.0, lower.detach(), upper.detach(), samples=48, pgd_steps=25) <= tolerance


def test_layers_that_cannot_be_rewritten_are_refused_with_the_layer_named():
    x = torch.rand(1, 1, 7, 7)
    with pytest.raises(UnsupportedModelError, match="'1'.*does not divide"):
        make_sound(nn.Sequential(nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(2)), x)
    with pytest.raises(UnsupportedModelError, match="ceil_mode"):
        make_sound(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), x)
