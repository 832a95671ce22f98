"""Bounds never exclude a reachable output: random points and PGD on the violation of each bound."""
import math

import pytest
import torch

from tests.verifiers.nets import OPERATIONS, op_net
from tests.violation import max_violation
from verifiers.bounds import compute_bounds

METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]
NORMS = [math.inf, 2.0]
EPS = {math.inf: 0.08, 2.0: 0.6}


def _tolerance(lower, upper):
    return 1e-5 * (1.0 + max(lower.abs().max().item(), upper.abs().max().item()))


def _inputs(seed=1, batch=2, channels=1, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, size, size, generator=g)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.02])  # pixels at and near the [0, 1] edges
    return x


@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("op", list(OPERATIONS) + ["mixed"])
def test_bounds_contain_every_sampled_and_attacked_output(op, stride, method, norm):
    net = op_net(op, stride, seed=stride)
    x = _inputs()
    eps = EPS[norm]
    lower, upper = compute_bounds(net, x, eps, norm=norm, method=method)
    assert lower.shape == upper.shape == (2, 5)
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
    with torch.no_grad():
        centre_out = net(x)
    assert (lower <= centre_out + _tolerance(lower, upper)).all()
    assert (centre_out <= upper + _tolerance(lower, upper)).all()
    violation = max_violation(net, x, eps, norm, lower.detach(), upper.detach(), samples=48, pgd_steps=25)
    assert violation <= _tolerance(lower, upper), f"{op} s{stride} {method} {norm}: violated by {violation:.3g}"


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
def test_per_sample_eps_bounds_are_sound(method, norm):
    net = op_net("mixed", 1, seed=3)
    x = _inputs(seed=2, batch=3)
    eps = torch.tensor([0.0, 0.5, 1.0]) * EPS[norm]
    lower, upper = compute_bounds(net, x, eps, norm=norm, method=method)
    violation = max_violation(net, x, eps, norm, lower.detach(), upper.detach(), samples=48, pgd_steps=25)
    assert violation <= _tolerance(lower, upper)
    with torch.no_grad():  # eps 0 pins the bounds to the output itself (up to the relaxation at eps 0)
        out = net(x[:1])
    assert torch.allclose(lower[:1], out, atol=1e-4) and torch.allclose(upper[:1], out, atol=1e-4)


@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
def test_per_sample_eps_matches_one_sample_at_a_time_for_crown(norm):
    """Full CROWN concretises every bound on the exact ball, so batching radii changes nothing."""
    net = op_net("sep_conv_3x3", 1, seed=4)
    x = _inputs(seed=3, batch=3)
    eps = torch.tensor([0.2, 0.5, 1.0]) * EPS[norm]
    lower, upper = compute_bounds(net, x, eps, norm=norm, method="crown")
    for i in range(3):
        lo, up = compute_bounds(net, x[i:i + 1], float(eps[i]), norm=norm, method="crown")
        assert torch.allclose(lower[i:i + 1], lo, atol=1e-5) and torch.allclose(upper[i:i + 1], up, atol=1e-5)


@pytest.mark.parametrize("method", ["crown", "crown-ibp"])
def test_per_sample_l2_eps_on_flat_inputs(method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.rand(3, 6)
    eps = torch.tensor([0.1, 0.3, 0.5])
    lower, upper = compute_bounds(net, x, eps, norm=2.0, method=method)
    for i in range(3):
        lo, up = compute_bounds(net, x[i:i + 1], float(eps[i]), norm=2.0, method=method)
        assert torch.allclose(lower[i], lo[0], atol=1e-5) and torch.allclose(upper[i], up[0], atol=1e-5)
