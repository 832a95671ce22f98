"""Robustness metrics: values and gradients."""

import pytest
import torch

from certnas.metrics import MetricConfig, input_gradient_norms, metric_clb, metric_jacobian
from tests.nets import op_net
from verifiers.radius import certified_radius


def _setup():
    net = op_net("mixed", 1, seed=11).double()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        y = net(x).argmax(1)  # correctly classified: positive radius
    return net, x, y


def _numeric_radius_gradient(net, x, y, step: float = 1e-5) -> torch.Tensor:
    """Central differences of the mean IBP certified radius (45 bisection steps on [0, 1]) in net.arch."""
    numeric = torch.zeros_like(net.arch)
    with torch.no_grad():
        for k in range(net.arch.shape[1]):
            values = []
            for sign in (1, -1):
                net.arch[0, k] += sign * step
                values.append(certified_radius(net, x, y, method="ibp", eps_max=1.0, steps=45).mean().item())
                net.arch[0, k] -= sign * step
            numeric[0, k] = (values[0] - values[1]) / (2 * step)
    return numeric


def test_radius_gradient_matches_finite_differences_of_the_certified_radius():
    net, x, y = _setup()
    config = MetricConfig(bound="ibp", clb_form="radius", radius_max=1.0, radius_steps=45, radius_min=0.0)
    value, details = metric_clb(net, x, y, config)
    radius = certified_radius(net, x, y, method="ibp", eps_max=1.0, steps=45)
    assert (radius > 0).all() and value.item() == pytest.approx(radius.mean().item(), rel=1e-9)
    grad, = torch.autograd.grad(value, net.arch)
    numeric = _numeric_radius_gradient(net, x, y)
    assert grad.abs().max() > 0
    assert torch.allclose(grad, numeric, rtol=2e-2, atol=1e-4 * numeric.abs().max().item()), (grad, numeric)


def _training_mode_setup():
    """A training-mode network (batch norm with the batch's statistics) and a batch in which one sample
    is misclassified (radius 0): the rows whose radius the gradient flows through are a subset."""
    net, x, y = _setup()
    net.train()
    with torch.no_grad():
        y = net(x).argmax(1)
    y[0] = (y[0] + 1) % net(x).shape[1]
    return net, x, y


def test_certified_radius_of_a_training_mode_network_is_the_whole_batch_radius():
    """Each radius is certified, and one bisection step above it is not, for the network the whole batch
    sees (every row bounded together at its own eps): the bisection must not bound subsets of the batch,
    whose batch-norm statistics make another network."""
    from verifiers.bounds import margin_lower_bound
    from verifiers.rounding import RTOL, logit_scale
    net, x, y = _training_mode_setup()
    radius = certified_radius(net, x, y, method="ibp", eps_max=1.0, steps=20)
    assert radius[0] == 0 and (radius[1:] > 0).all()
    tolerance = RTOL * logit_scale(net, x)
    assert (margin_lower_bound(net, x, y, radius, method="ibp")[1:] > tolerance[1:]).all()
    assert (margin_lower_bound(net, x, y, radius + 2.0 ** -20, method="ibp")[1:] <= tolerance[1:]).all()


def test_radius_gradient_of_a_training_mode_network_matches_finite_differences():
    """The implicit gradient is taken on the network whose radii were measured (the whole batch), not
    on the certified rows alone."""
    net, x, y = _training_mode_setup()
    config = MetricConfig(bound="ibp", clb_form="radius", radius_max=1.0, radius_steps=45, radius_min=0.0)
    value, _ = metric_clb(net, x, y, config)
    grad, = torch.autograd.grad(value, net.arch)
    numeric = _numeric_radius_gradient(net, x, y)
    assert grad.abs().max() > 0
    assert torch.allclose(grad, numeric, rtol=2e-2, atol=1e-4 * numeric.abs().max().item()), (grad, numeric)


def test_radius_gradient_is_right_in_float32_at_radii_near_one_millionth():
    """Radii near radius_min (1e-6) are where a search's radius form starts. A linear network's L-inf
    margin bound is m0 - eps * ||w_0 - w_1||_1, so d radius / d b_0 = 1 / ||w_0 - w_1||_1 (up to the
    rounding tolerance's 0.1%). The slope dg/d eps is a finite difference: a step of 1e-3 * radius
    (1e-9) is below float32's pixel spacing (6e-8 at 0.5), so it measured rounding, not the slope."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x = torch.full((1, 1, 4, 4), 0.5)
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(2, 16) * 30)
        net[1].bias.zero_()
        logits = net(x)[0]
        l1 = (net[1].weight[0] - net[1].weight[1]).abs().sum().item()
        # margin = tolerance + 1e-6 * l1: certified up to a radius of about 1e-6
        net[1].bias[0] = logits[1] - logits[0] + 1e-3 * (1 + logits[1].abs()) + 1e-6 * l1
    y = torch.tensor([0])
    config = MetricConfig(bound="ibp", clb_form="radius", radius_max=0.3, radius_steps=30, radius_min=1e-7)
    value, _ = metric_clb(net, x, y, config)
    assert 3e-7 < value.item() < 3e-6
    grad, = torch.autograd.grad(value, net[1].bias)
    assert grad[0].item() == pytest.approx(1 / l1, rel=2e-2) and grad[1].item() == pytest.approx(-1 / l1, rel=2e-2)


def test_the_log_radius_form_has_a_signal_where_linear_bisection_rounds_to_zero():
    """Radii below a linear bisection's first step come out as 0 with no gradient (the search then
    moves the architecture by L_val alone); bisecting in log space from radius_min resolves them."""
    net, x, y = _setup()
    coarse = dict(bound="ibp", clb_form="radius", radius_max=100.0, radius_steps=6)  # linear steps of 1.6
    radius = certified_radius(net, x, y, method="ibp", eps_max=100.0, steps=6, eps_min=1e-4)
    assert (radius > 1e-4).all() and (radius < 100.0 * 2.0 ** -6).all()  # the case in question
    linear, _ = metric_clb(net, x, y, MetricConfig(**coarse, radius_min=0.0))
    grad = torch.autograd.grad(linear, net.arch, allow_unused=True)[0]
    assert linear.item() == 0 and (grad is None or grad.abs().max() == 0)
    logged, details = metric_clb(net, x, y, MetricConfig(**coarse, radius_min=1e-4))
    assert logged.item() == pytest.approx(radius.mean().item(), rel=1e-9) and details["clb_certified"] == 1.0
    assert torch.autograd.grad(logged, net.arch)[0].abs().max() > 0


def test_certified_radius_is_certified_and_tight_to_the_bisection_tolerance():
    net, x, y = _setup()
    from verifiers.bounds import margin_lower_bound
    from verifiers.rounding import RTOL, logit_scale
    radius = certified_radius(net, x, y, method="crown-ibp", eps_max=1.0, steps=12)
    # certified: the margin clears the rounding tolerance at the radius, and no longer one step above it
    tolerance = RTOL * logit_scale(net, x)
    assert (margin_lower_bound(net, x, y, radius, method="crown-ibp") > tolerance).all()
    assert (margin_lower_bound(net, x, y, radius + 2.0 ** -12, method="crown-ibp") <= tolerance).all()


def test_jacobian_term_is_minus_eps_times_mean_dual_norm():
    net, x, y = _setup()
    value, details = metric_jacobian(net, x, y, MetricConfig(eps=0.1, norm="inf"))
    x_req = x.clone().requires_grad_(True)
    out = net(x_req)
    norms = []
    for k in range(out.shape[1]):
        g, = torch.autograd.grad(out[:, k].sum(), x_req, retain_graph=True)
        norms.append(g.flatten(1).abs().sum(1))
    assert value.item() == pytest.approx(-0.1 * torch.stack(norms, 1).mean().item(), rel=1e-9)
    assert torch.autograd.grad(value, net.arch)[0].abs().sum() > 0


def test_jacobian_projections_estimate_is_unbiased_over_class_draws():
    net, x, y = _setup()
    exact = input_gradient_norms(net, x, torch.arange(5), 2.0).mean().item()
    torch.manual_seed(0)
    draws = [metric_jacobian(net, x, y, MetricConfig(eps=1.0, norm="2", jacobian_projections=2))[0].item()
             for _ in range(60)]
    assert -sum(draws) / len(draws) == pytest.approx(exact, rel=0.1)
    assert len(set(round(d, 9) for d in draws)) > 1


def test_clb_margin_on_the_interval_engine_equals_auto_lirpa_ibp_and_is_sound_against_its_crown_ibp():
    """The L-inf clb runs on verifiers.interval; auto_LiRPA's bound of the same supernet is the reference:
    IBP equal in value and architecture gradient; CROWN-IBP between IBP and auto_LiRPA's CROWN-IBP (on a
    supernet, auto_LiRPA is tighter where one node feeds several operations)."""
    from certnas.metrics import clb_margins
    from certnas.space.supernet import SearchNetwork
    from verifiers.bounds import margin_lower_bound
    torch.manual_seed(4)
    net = SearchNetwork(C=2, num_classes=4, layers=3, in_channels=1, steps=2, multiplier=2).double().eval()
    with torch.no_grad():
        net.arch_normal.normal_(0, 1)
        net.arch_reduce.normal_(0, 1)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    ours = clb_margins(net, x, y, MetricConfig(eps=0.003, norm="inf", bound="ibp"))
    reference = margin_lower_bound(net, x, y, 0.003, norm="inf", method="ibp")
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-9), (ours, reference)
    grad_ours = torch.autograd.grad(ours.sum(), net.arch_normal)[0]
    grad_reference = torch.autograd.grad(reference.sum(), net.arch_normal)[0]
    assert grad_ours.abs().max() > 0
    assert torch.allclose(grad_ours, grad_reference, rtol=1e-5, atol=1e-9 * grad_reference.abs().max().item())
    crown = clb_margins(net, x, y, MetricConfig(eps=0.003, norm="inf", bound="crown-ibp")).detach()
    crown_reference = margin_lower_bound(net, x, y, 0.003, norm="inf", method="crown-ibp").detach()
    assert (crown >= ours.detach() - 1e-9).all() and (crown <= crown_reference + 1e-9).all()


class _TwoWayEdge(torch.nn.Module):
    """One edge mixing two operations that compute the same function, x and A^-1 (A x), by softmax(arch),
    then a fixed linear classifier. IBP bounds A^-1 (A x) twice as wide as x (A = [[1, 1], [1, -1]]), so
    the first operation is the more certifiable one while the clean function ignores the mixture."""

    def __init__(self):
        super().__init__()
        self.arch = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.encode = torch.nn.Linear(2, 2, bias=False).double()
        self.decode = torch.nn.Linear(2, 2, bias=False).double()
        self.head = torch.nn.Linear(2, 3).double()
        with torch.no_grad():
            self.encode.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
            self.decode.weight.copy_(torch.linalg.inv(self.encode.weight))
            self.head.weight.copy_(torch.tensor([[2.0, -1.0], [-1.0, 2.0], [-1.0, -1.0]]))
            self.head.bias.copy_(torch.tensor([0.0, 0.0, 1.5]))
        for module in (self.encode, self.decode, self.head):
            module.requires_grad_(False)

    def forward(self, x):
        w = torch.softmax(self.arch, 0)
        return self.head(w[0] * x + w[1] * self.decode(self.encode(x)))


def test_clb_search_moves_weight_onto_the_more_certifiable_operation():
    """The CLB signal has a direction: L_val's architecture gradient is zero (both operations are the same
    function), and maximising the IBP margin bound alone moves the mixture onto the operation with the
    narrower intervals."""
    torch.manual_seed(0)
    net = _TwoWayEdge()
    x = torch.rand(64, 2, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    assert len(set(y.tolist())) > 1
    loss_grad = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), net.arch)[0]
    assert loss_grad.abs().max() < 1e-12  # the clean objective cannot choose
    config = MetricConfig(eps=0.05, norm="inf", bound="ibp")
    optimiser = torch.optim.Adam([net.arch], lr=0.1)
    start, _ = metric_clb(net, x, y, config)
    for _ in range(30):
        optimiser.zero_grad()
        value, _ = metric_clb(net, x, y, config)
        (-value).backward()
        optimiser.step()
    end, _ = metric_clb(net, x, y, config)
    weights = torch.softmax(net.arch.detach(), 0)
    assert weights[0] > 0.9, weights
    assert end.item() > start.item()


def test_jacobian_term_runs_the_model_once_and_draws_its_classes_from_the_output():
    """One forward pass (the one differentiated twice): the number of classes comes from its logits, not
    from a pass of its own (which cost a search step about 5% and moved batch-norm statistics)."""
    net, x, y = _setup()
    calls = []
    handle = net.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    try:
        torch.manual_seed(0)
        value, _ = metric_jacobian(net, x, y, MetricConfig(eps=1.0, norm="2", jacobian_projections=2))
    finally:
        handle.remove()
    assert calls == [torch.Size([len(x), 5])]
    torch.manual_seed(0)
    classes = torch.randperm(5)[:2]  # the draw the term makes with the same seed
    expected = input_gradient_norms(net, x, classes, 2.0).mean().item()
    assert -value.item() == pytest.approx(expected, rel=1e-9)
