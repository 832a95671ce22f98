"""Where the exact answer is known in closed form, CROWN reaches it."""
import math

import pytest
import torch
import torch.nn as nn

from verifiers.layers import AvgPool3x3, GlobalAvgPool
from tests.verifiers.nets import randomise_batch_norm
from verifiers.bounds import margin_lower_bound


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
@pytest.mark.parametrize("stride", [1, 2])
def test_crown_margin_of_linear_network_equals_closed_form_minimum(norm, stride):
    torch.manual_seed(stride)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), AvgPool3x3(4, stride),
                        nn.Conv2d(4, 4, 3, padding=1), GlobalAvgPool(), nn.Linear(4, 5))
    randomise_batch_norm(net, torch.Generator().manual_seed(0))
    net.eval()
    x = 0.3 + 0.4 * torch.rand(3, 2, 8, 8)  # away from the [0, 1] edges
    eps = 0.05 if norm == math.inf else 0.3
    y = torch.tensor([0, 2, 4])
    bound = margin_lower_bound(net, x, y, eps, norm=norm, method="crown")
    dual = 1.0 if norm == math.inf else 2.0
    for i in range(3):
        xi = x[i:i + 1].clone().requires_grad_(True)
        exact = math.inf
        for j in range(5):
            if j == y[i]:
                continue
            out = net(xi)[0]
            margin = out[y[i]] - out[j]
            grad, = torch.autograd.grad(margin, xi)
            exact = min(exact, margin.item() - eps * grad.flatten().norm(p=dual).item())
        assert bound[i].item() == pytest.approx(exact, abs=1e-4, rel=1e-4)
