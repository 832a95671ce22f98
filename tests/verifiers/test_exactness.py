"""Where the exact answer is known in closed form, CROWN reaches it."""
import math

import pytest
import torch
import torch.nn as nn

import torch.nn.functional as F

from verifiers.layers import AvgPool3x3, GlobalAvgPool, GridAvgPool
from tests.verifiers.nets import randomise_batch_norm
from verifiers.bounds import margin_lower_bound


def test_grid_avg_pool_is_the_mean_of_each_grid_cell_flattened_channel_major():
    x = torch.randn(3, 4, 8, 12)
    assert torch.allclose(GridAvgPool(2)(x), F.avg_pool2d(x, (4, 6)).flatten(1), atol=1e-6)
    assert torch.allclose(GridAvgPool(1)(x), GlobalAvgPool()(x), atol=1e-6)
    with pytest.raises(ValueError, match="does not split"):
        GridAvgPool(3)(x)
    with pytest.raises(ValueError, match="at least 1"):
        GridAvgPool(0)


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
@pytest.mark.parametrize("stride,grid", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_crown_margin_of_linear_network_equals_closed_form_minimum(norm, stride, grid):
    torch.manual_seed(stride)
    head = GlobalAvgPool() if grid == 1 else GridAvgPool(grid)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), AvgPool3x3(4, stride),
                        nn.Conv2d(4, 4, 3, padding=1), head, nn.Linear(4 * grid ** 2, 5))
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
