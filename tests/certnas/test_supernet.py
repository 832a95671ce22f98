"""The search network: shapes, registered architecture weights, sound bounds, PC-DARTS edges."""
import math

import pytest
import torch

from certnas.space.supernet import PartialMixedOp, SearchNetwork
from tests.violation import max_violation
from verifiers.bounds import compute_bounds


def _net(**kwargs):
    torch.manual_seed(0)
    return SearchNetwork(C=4, num_classes=10, layers=3, in_channels=1, **kwargs)


def test_architecture_weights_are_registered_parameters():
    net = _net(partial_channels=2, edge_normalization=True)
    names = dict(net.named_parameters())
    for name in ("arch_normal", "arch_reduce", "edge_normal", "edge_reduce"):
        assert name in names and name in net.state_dict()
    assert {id(p) for p in net.arch_parameters()}.isdisjoint({id(p) for p in net.weight_parameters()})


def test_partial_channel_edge_matches_the_slice_and_shuffle_definition():
    torch.manual_seed(0)
    op = PartialMixedOp(8, 1, 4).eval()
    x = torch.randn(2, 8, 6, 6)
    weights = torch.softmax(torch.randn(8), 0)
    mixed = op.mixed(x[:, :2], weights)
    joined = torch.cat([mixed, x[:, 2:]], dim=1)
    shuffled = joined.view(2, 4, 2, 6, 6).transpose(1, 2).reshape(2, 8, 6, 6)  # channel_shuffle(., 4)
    assert torch.allclose(op(x, weights), shuffled, atol=1e-6)
    op2 = PartialMixedOp(8, 2, 4).eval()
    joined = torch.cat([op2.mixed(x[:, :2], weights), torch.nn.functional.max_pool2d(x[:, 2:], 2, 2)], dim=1)
    assert torch.allclose(op2(x, weights), joined.view(2, 4, 2, 3, 3).transpose(1, 2).reshape(2, 8, 3, 3), atol=1e-6)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
@pytest.mark.parametrize("options", [{}, {"partial_channels": 2, "edge_normalization": True}], ids=["darts", "pc-darts"])
def test_supernet_bounds_are_sound_for_every_method(method, options):
    net = _net(**options).eval()
    x = torch.rand(2, 1, 16, 16)
    lower, upper = compute_bounds(net, x, 0.01, method=method)
    assert max_violation(net, x, 0.01, math.inf, lower.detach(), upper.detach(), samples=16, pgd_steps=10) \
        <= 1e-5 * (1 + upper.abs().max().item())
