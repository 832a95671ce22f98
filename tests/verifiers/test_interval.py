"""The plain-PyTorch IBP / CROWN-IBP engine, checked without trusting it: against auto_LiRPA's bounds
(an independent implementation of the same relaxations), against sampled and PGD-searched points, and
against the exact MILP minimum on tiny networks."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.verifiers.nets import OPERATIONS, op_net
from tests.violation import max_violation
from verifiers.bounds import compute_bounds, margin_lower_bounds
from verifiers.errors import UnsupportedModelError
from verifiers.interval import interval_logit_bounds, interval_margins
from verifiers.milp import exact_margin

EPS = 0.08


def _relative(a, b):
    return ((a - b).abs().max() / (1 + b.abs().max())).item()


def _inputs(seed=1, batch=2, size=8):
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.02])  # pixels at and near the [0, 1] edges
    return x


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("op", list(OPERATIONS) + ["mixed"])
def test_margins_equal_auto_lirpa_ibp_and_crown_ibp_on_every_operation(op, stride):
    net = op_net(op, stride, seed=stride)
    x, y = _inputs(), torch.tensor([0, 3])
    bounds = interval_margins(net, x, y, EPS, crown_ibp=True)
    assert _relative(bounds.ibp, margin_lower_bounds(net, x, y, EPS, method="ibp")) < 1e-5
    assert _relative(bounds.crown_ibp, margin_lower_bounds(net, x, y, EPS, method="crown-ibp")) < 1e-5
    with torch.no_grad():
        assert torch.allclose(bounds.logits, net(x), atol=1e-6)


@pytest.mark.parametrize("crown_ibp", [False, True], ids=["ibp", "crown-ibp"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("op", list(OPERATIONS) + ["mixed"])
def test_logit_bounds_contain_every_sampled_and_attacked_output(op, stride, crown_ibp):
    net = op_net(op, stride, seed=stride)
    x = _inputs()
    lower, upper = interval_logit_bounds(net, x, EPS, crown_ibp=crown_ibp)
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all() and (lower <= upper).all()
    tolerance = 1e-5 * (1 + max(lower.abs().max().item(), upper.abs().max().item()))
    violation = max_violation(net, x, EPS, math.inf, lower.detach(), upper.detach(), samples=48, pgd_steps=25)
    assert violation <= tolerance, f"{op} s{stride}: violated by {violation:.3g}"
    reference = compute_bounds(net, x, EPS, method="crown-ibp" if crown_ibp else "ibp")
    assert _relative(lower, reference[0]) < 1e-5 and _relative(upper, reference[1]) < 1e-5


def _tiny_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)).eval()


@pytest.mark.parametrize("seed,eps", [(0, 0.05), (1, 0.15)])
def test_margin_bounds_never_exceed_the_exact_milp_minimum(seed, eps):
    net = _tiny_mlp(seed)
    x = torch.rand(3, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = net(x).argmax(1)
    bounds = interval_margins(net, x, y, eps, crown_ibp=True)
    for i in range(len(x)):
        exact = exact_margin(net, x[i], int(y[i]), eps)
        assert exact.optimal, exact.message
        for margins in (bounds.ibp, bounds.crown_ibp):
            others = torch.cat([margins[i, :y[i]], margins[i, y[i] + 1:]])
            assert others.min().item() <= exact.margin + 1e-5


def test_crown_ibp_on_the_hardest_rows_is_sound_and_between_ibp_and_full_crown_ibp():
    net = op_net("sep_conv_3x3", 1, seed=2)
    x, y = _inputs(batch=3), torch.tensor([0, 1, 4])
    full = interval_margins(net, x, y, EPS, crown_ibp=True)
    partial = interval_margins(net, x, y, EPS, crown_ibp=True, crown_rows=2)
    assert (partial.crown_ibp >= full.ibp - 1e-6).all()
    assert (partial.crown_ibp <= torch.maximum(full.crown_ibp, full.ibp) + 1e-6).all()
    hardest = full.ibp.scatter(1, y[:, None], float("inf")).topk(2, dim=1, largest=False).indices
    assert torch.allclose(partial.crown_ibp.gather(1, hardest),
                          torch.maximum(full.crown_ibp, full.ibp).gather(1, hardest), atol=1e-6)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_gradients_equal_auto_lirpa_gradients(method):
    net = op_net("mixed", 1, seed=6).double()
    x, y = _inputs(batch=3).double(), torch.tensor([0, 2, 4])
    bounds = interval_margins(net, x, y, EPS, crown_ibp=method == "crown-ibp")
    mine = torch.autograd.grad((bounds.ibp if method == "ibp" else bounds.crown_ibp).sum(), list(net.parameters()))
    reference = torch.autograd.grad(margin_lower_bounds(net, x, y, EPS, method=method).sum(), list(net.parameters()))
    for a, b in zip(mine, reference):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in mine)


class _Squares(nn.Module):
    def forward(self, x):
        return (x.flatten(1) * x.flatten(1))[:, :3]


class _Sigmoid(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x.flatten(1))[:, :3]


class _NativeMaxPool(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, 2).flatten(1)[:, :3]


class _BatchMix(nn.Module):
    def forward(self, x):
        return torch.cat([x, x]).flatten(1)[:3, :3]


@pytest.mark.parametrize("model", [_Squares(), _Sigmoid(), _NativeMaxPool(), _BatchMix()],
                         ids=["product", "sigmoid", "native-max-pool", "batch-concat"])
def test_unsupported_operations_are_refused_with_their_name(model):
    with pytest.raises(UnsupportedModelError, match="interval bounds"):
        interval_margins(model, torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]), 0.1)


def test_per_sample_eps_matches_one_sample_at_a_time():
    net = op_net("dil_conv_3x3", 2, seed=3)
    x, y = _inputs(batch=3), torch.tensor([1, 2, 3])
    eps = torch.tensor([0.0, 0.04, 0.1])
    together = interval_margins(net, x, y, eps, crown_ibp=True)
    for i in range(3):
        alone = interval_margins(net, x[i:i + 1], y[i:i + 1], float(eps[i]), crown_ibp=True)
        assert torch.allclose(together.ibp[i], alone.ibp[0], atol=1e-6)
        assert torch.allclose(together.crown_ibp[i], alone.crown_ibp[0], atol=1e-6)
    with torch.no_grad():  # eps 0: the bounds are the clean margins
        logits = net(x[:1])
    assert torch.allclose(together.ibp[0], logits[0, 1] - logits[0], atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("op", list(OPERATIONS) + ["mixed"])
def test_fused_and_three_convolution_forms_give_the_same_bounds_and_gradients(op, stride, monkeypatch):
    """Small convolutions run value, centre and radius as one grouped convolution (FUSE_LIMIT); the tests
    above check that form (their nets are small) and this one the equality of both forms, gradients included."""
    import verifiers.interval as interval
    net = op_net(op, stride, seed=stride).double()
    x, y = _inputs().double(), torch.tensor([0, 3])
    params = [p for p in net.parameters() if p.requires_grad]
    results = []
    for limit in (10 ** 9, 0):  # every convolution fused; none
        monkeypatch.setattr(interval, "FUSE_LIMIT", limit)
        bounds = interval_margins(net, x, y, EPS, crown_ibp=True)
        total = bounds.ibp.sum() + bounds.crown_ibp.sum() + bounds.logits.sum()
        results.append((bounds.ibp.detach(), bounds.crown_ibp.detach(), torch.autograd.grad(total, params)))
    (ibp_a, crown_a, grads_a), (ibp_b, crown_b, grads_b) = results
    assert _relative(ibp_a, ibp_b) < 1e-10 and _relative(crown_a, crown_b) < 1e-10
    assert all(_relative(a, b) < 1e-10 for a, b in zip(grads_a, grads_b))


def test_small_convolutions_are_fused_and_large_ones_are_not(monkeypatch):
    import types
    import verifiers.interval as interval
    calls = []

    def conv2d(*args, **kwargs):
        calls.append(args[0].shape[1])  # input channels of each call
        return F.conv2d(*args, **kwargs)
    monkeypatch.setattr(interval, "F", types.SimpleNamespace(conv2d=conv2d))
    weight, bias = torch.randn(8, 4, 3, 3), torch.randn(8)
    for batch, expected in ((16, [12]), (17, [4, 4, 4])):  # 16 x 8 = 128 = FUSE_LIMIT: one call on 3 x 4 channels
        calls.clear()
        box = interval.Interval.from_ball(torch.rand(batch, 4, 5, 5), 0.1)
        out = interval._conv2d(box, weight, bias, 1, 1)
        assert calls == expected
        assert torch.allclose(out.value, F.conv2d(box.value, weight, bias, 1, 1), atol=1e-6)
        assert torch.allclose(out.center, F.conv2d(box.center, weight, bias, 1, 1), atol=1e-6)
        assert torch.allclose(out.radius, F.conv2d(box.radius, weight.abs(), None, 1, 1), atol=1e-6)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "three-convolutions"])
@pytest.mark.parametrize("op", list(OPERATIONS) + ["mixed"])
def test_bounds_without_the_clean_pass_equal_those_with_it(op, fuse, monkeypatch):
    """clean=False skips the clean value (certified training once the clean loss has weight 0): the same
    IBP and CROWN-IBP bounds and gradients, no logits."""
    import verifiers.interval as interval
    monkeypatch.setattr(interval, "FUSE_LIMIT", 10 ** 9 if fuse else 0)
    net = op_net(op, 2, seed=2).double()
    x, y = _inputs().double(), torch.tensor([0, 3])
    params = [p for p in net.parameters() if p.requires_grad]
    results = []
    for clean in (True, False):
        bounds = interval_margins(net, x, y, EPS, crown_ibp=True, clean=clean)
        grads = torch.autograd.grad(bounds.ibp.sum() + bounds.crown_ibp.sum(), params, allow_unused=True)
        results.append((bounds, grads))
    (with_clean, grads_a), (without, grads_b) = results
    assert without.logits is None and with_clean.logits is not None
    assert _relative(with_clean.ibp, without.ibp) < 1e-10 and _relative(with_clean.crown_ibp, without.crown_ibp) < 1e-10
    assert all((a is None) == (b is None) and (a is None or _relative(a, b) < 1e-10) for a, b in zip(grads_a, grads_b))


def test_training_mode_batch_norm_is_refused_without_the_clean_pass():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).train()
    x, y = _inputs(), torch.tensor([0, 2])
    assert interval_margins(net, x, y, EPS, clean=True).logits.shape == (2, 3)
    with pytest.raises(UnsupportedModelError, match="batch norm"):
        interval_margins(net, x, y, EPS, clean=False)
    net.eval()  # running statistics: no clean value needed
    assert torch.isfinite(interval_margins(net, x, y, EPS, clean=False).ibp).all()


@pytest.mark.parametrize("momentum,affine", [(0.1, True), (0.5, False)])
def test_training_mode_batch_norm_on_an_interval_matches_torch_value_gradient_and_running_statistics(momentum, affine):
    """The interval engine normalises the clean value itself (no second F.batch_norm pass): the clean logits,
    their gradients (through the batch statistics) and the running statistics must be torch's own."""
    def make():
        torch.manual_seed(3)
        net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=momentum, affine=affine), nn.ReLU(),
                            nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double().train()
        if affine:
            with torch.no_grad():
                net[1].weight.uniform_(0.5, 2.0), net[1].bias.uniform_(-1.0, 1.0)
        net[1].running_mean.fill_(0.3), net[1].running_var.fill_(2.0)
        return net
    x, y = _inputs(batch=5).double() * 3 + 1, torch.tensor([0, 2, 1, 1, 0])  # a mean far from 0 and a std not 1
    ours, theirs = make(), make()
    for _ in range(2):  # twice: the second step starts from updated running statistics
        logits, reference = interval_margins(ours, x, y, EPS).logits, theirs(x)
    assert torch.allclose(logits, reference, atol=1e-12, rtol=0)
    grads = torch.autograd.grad(logits.square().sum(), list(ours.parameters()))
    expected = torch.autograd.grad(reference.square().sum(), list(theirs.parameters()))
    assert len(grads) == (4 + 2 * affine) and all(torch.allclose(a, b, atol=1e-10, rtol=0)
                                                  for a, b in zip(grads, expected))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours[1], name).double(), getattr(theirs[1], name).double(), atol=1e-12, rtol=0)


def test_a_plain_and_an_interval_forward_through_one_training_mode_batch_norm_share_a_backward():
    """The search's architecture loss adds a plain forward's loss and a bound of the same network: the interval
    engine's running-statistics update must not invalidate what the plain forward saved for its backward."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3)).train()
    x, y = _inputs(batch=3), torch.tensor([0, 2, 1])
    loss = F.cross_entropy(net(x), y) - interval_margins(net, x, y, EPS).ibp.mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_relu_inputs_are_every_relu_input_in_forward_order_and_contain_the_clean_input():
    """On a cell with parallel branches and a max-pool (a tree of ReLUs): one (lower, upper) per ReLU the network
    calls, in the order it calls them (recorded by a torch function mode, not by the engine), each of that
    input's shape and containing its clean value."""
    from torch.overrides import TorchFunctionMode
    from tests.verifiers.nets import cell_net
    seen = []

    class RecordRelu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.relu, F.relu):
                seen.append(args[0].detach().clone())
            return func(*args, **(kwargs or {}))

    net = cell_net(seed=2)
    x, y = _inputs(seed=4), torch.tensor([1, 2])
    with torch.no_grad(), RecordRelu():
        net(x)
    found = interval_margins(net, x, y, EPS).relu_inputs()
    assert len(seen) >= 5 and len(found) == len(seen)
    for (lower, upper), clean in zip(found, seen):
        assert lower.shape == clean.shape
        assert (lower <= clean + 1e-5).all() and (clean <= upper + 1e-5).all() and (lower < upper).any()
