"""Gradients of the margin lower bound reach the architecture parameters, and are right."""
import pytest
import torch

from tests.verifiers.nets import op_net
from verifiers.bounds import margin_lower_bound


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
@pytest.mark.parametrize("stride", [1, 2])
def test_margin_bound_gradient_wrt_architecture_matches_finite_differences(method, stride):
    net = op_net("mixed", stride, seed=5).double()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    y = torch.tensor([0, 1, 2, 3])
    eps = 0.03

    def objective():
        return margin_lower_bound(net, x, y, eps, method=method).sum()

    value = objective()
    grad, = torch.autograd.grad(value, net.arch)
    assert grad.abs().sum() > 0
    step = 1e-6
    numeric = torch.zeros_like(net.arch)
    with torch.no_grad():
        for k in range(net.arch.shape[1]):
            net.arch[0, k] += step
            up = objective().item()
            net.arch[0, k] -= 2 * step
            down = objective().item()
            net.arch[0, k] += step
            numeric[0, k] = (up - down) / (2 * step)
    assert torch.allclose(grad, numeric, rtol=1e-4, atol=1e-6), (grad, numeric)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_margin_bound_gradient_reaches_every_weight_parameter(method):
    net = op_net("sep_conv_3x3", 1, seed=6)
    x = torch.rand(2, 1, 8, 8)
    margin_lower_bound(net, x, torch.tensor([0, 1]), 0.02, method=method).sum().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_alpha_crown_returns_a_bound_without_graph():
    net = op_net("skip_connect", 1)
    bound = margin_lower_bound(net, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.02, method="alpha-crown")
    assert not bound.requires_grad
