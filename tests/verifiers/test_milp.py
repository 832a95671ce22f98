"""The exact MILP minimum margin is never below any method's margin lower bound."""
import pytest
import torch
import torch.nn as nn

from verifiers.bounds import margin_lower_bound
from verifiers.milp import exact_margin

METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)).eval()


def _conv(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("kind,seed,eps", [("mlp", 0, 0.05), ("mlp", 1, 0.15), ("conv", 2, 0.05), ("conv", 3, 0.12)])
def test_margin_lower_bound_never_exceeds_milp_optimum(kind, seed, eps):
    net = _mlp(seed) if kind == "mlp" else _conv(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 1, 2, 4, generator=g).flatten(1) if kind == "mlp" else torch.rand(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    bounds = {m: margin_lower_bound(net, x, y, eps, method=m) for m in METHODS}
    for i in range(len(x)):
        exact = exact_margin(net, x[i], int(y[i]), eps)
        assert exact.optimal, exact.message
        with torch.no_grad():
            centre = net(x[i:i + 1])[0]
        centre_margin = (centre[y[i]] - torch.cat([centre[:y[i]], centre[y[i] + 1:]]).max()).item()
        assert exact.margin <= centre_margin + 1e-6  # the MILP optimum is a real minimum
        for method, bound in bounds.items():
            assert bound[i].item() <= exact.margin + 1e-5 * (1 + abs(exact.margin)), (method, i)


def test_milp_encodes_the_fixed_linear_layers_exactly():
    """Average pooling (rewritten), global pooling: the MILP sees the same function as torch."""
    from verifiers.layers import AvgPool3x3, GlobalAvgPool
    from verifiers.milp import relu_layers
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), AvgPool3x3(2, 2), GlobalAvgPool(), nn.Linear(2, 3)).eval()
    x = torch.rand(1, 8, 8)
    (w1, b1), (w2, b2) = relu_layers(net, (1, 8, 8))
    import numpy as np
    hidden = np.maximum(w1 @ x.double().flatten().numpy() + b1, 0)
    assert np.allclose(w2 @ hidden + b2, net(x.unsqueeze(0)).detach().double().numpy()[0], atol=1e-6)
