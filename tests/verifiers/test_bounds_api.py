"""The public API: argument checks, unsupported layers, caching, specification margin."""
import math

import pytest
import torch
import torch.nn as nn

from verifiers.layers import GlobalAvgPool
from tests.verifiers.nets import op_net
from verifiers import bounds, lirpa
from verifiers.bounds import BoundInputError, UnsupportedModelError, compute_bounds, margin_lower_bound


@pytest.fixture
def net():
    return op_net("dil_conv_3x3", 1)


@pytest.fixture
def x():
    return torch.rand(2, 1, 8, 8)


@pytest.mark.parametrize("eps,message", [(-0.1, "eps must be >= 0"), (float("nan"), "eps is NaN"),
                                         (torch.tensor([0.1, -1.0]), "eps must be >= 0"),
                                         (torch.tensor([0.1, 0.2, 0.3]), "shape (2,)"), ("abc", "number")])
def test_bad_eps_is_rejected_with_a_clear_message(net, x, eps, message):
    with pytest.raises(BoundInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compute_bounds(net, x, eps)


def test_nan_input_is_rejected(net, x):
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(BoundInputError, match="NaN"):
        compute_bounds(net, x, 0.1)


def test_unknown_method_and_norm_list_the_known_ones(net, x):
    with pytest.raises(BoundInputError, match="known methods: ibp, crown-ibp, crown, alpha-crown"):
        compute_bounds(net, x, 0.1, method="crwn")
    with pytest.raises(BoundInputError, match="supported norms: inf, 2"):
        compute_bounds(net, x, 0.1, norm=1)


def test_label_shape_mismatch_and_range_are_rejected(net, x):
    with pytest.raises(BoundInputError, match=r"y must have shape \(2,\)"):
        margin_lower_bound(net, x, torch.tensor([0, 1, 2]), 0.1)
    with pytest.raises(BoundInputError, match="labels must lie in"):
        margin_lower_bound(net, x, torch.tensor([0, 9]), 0.1)


@pytest.mark.parametrize("layer", [nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.MaxPool2d(3, 1, 1)],
                         ids=["AvgPool2d", "MaxPool2d"])
def test_native_pooling_is_bounded_through_its_sound_rewrite(layer, x):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), layer, GlobalAvgPool(), nn.Linear(2, 3)).eval()
    lower, upper = compute_bounds(model, x, 0.1, method="ibp")
    with torch.no_grad():
        out = model(x)
    assert (lower <= out + 1e-5).all() and (out <= upper + 1e-5).all()
    assert isinstance(model[1], type(layer))  # the caller's model is not changed


def test_pooling_that_cannot_be_rewritten_is_refused_naming_the_layer(x):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveMaxPool2d(3), nn.Flatten(), nn.Linear(18, 3)).eval()
    with pytest.raises(UnsupportedModelError, match=r"'1' \(AdaptiveMaxPool2d\)"):
        compute_bounds(model, x, 0.1, method="ibp")


def test_unsupported_activation_is_refused_naming_the_operation(x):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(128, 3)).eval()
    with pytest.raises(UnsupportedModelError, match="Tanh"):
        compute_bounds(model, x, 0.1, method="crown-ibp")


def test_repeated_calls_do_not_retrace(net, x, monkeypatch):
    calls = []
    original = lirpa.BoundedModule

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(lirpa, "BoundedModule", counting)
    for batch in (x, torch.rand(5, 1, 8, 8), x):
        compute_bounds(net, batch, 0.05, method="crown-ibp")
    assert len(calls) == 1
    compute_bounds(net, torch.rand(2, 1, 10, 10), 0.05, method="crown-ibp")  # new shape: new trace
    assert len(calls) == 2


def test_cached_wrapper_sees_updated_weights(net, x):
    y = torch.tensor([0, 1])
    before = margin_lower_bound(net, x, y, 0.05).detach()
    with torch.no_grad():
        net.head.bias[0] += 1.0
    after = margin_lower_bound(net, x, y, 0.05).detach()
    assert not torch.allclose(before, after)
    fresh = op_net("dil_conv_3x3", 1)
    with torch.no_grad():
        fresh.head.bias[0] += 1.0
    assert torch.allclose(after, margin_lower_bound(fresh, x, y, 0.05).detach(), atol=1e-6)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_specification_margin_is_at_least_the_difference_of_logit_bounds(net, x, method):
    y = torch.tensor([1, 3])
    margin = margin_lower_bound(net, x, y, 0.05, method=method)
    lower, upper = compute_bounds(net, x, 0.05, method=method)
    others = upper.scatter(1, y.view(-1, 1), -math.inf).max(dim=1).values
    naive = lower.gather(1, y.view(-1, 1)).squeeze(1) - others
    assert (margin >= naive - 1e-5).all()


def test_margin_specification_rows():
    spec = bounds.margin_specification(torch.tensor([2, 0]), 3)
    expected = torch.tensor([[[-1.0, 0, 1], [0, -1, 1]], [[1, -1, 0], [1, 0, -1]]])
    assert torch.equal(spec, expected)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_cached_wrapper_sees_updated_architecture_weights(method, x):
    y = torch.tensor([0, 1])
    net = op_net("mixed", 1, seed=5)
    margin_lower_bound(net, x, y, 0.03, method=method)  # trace and cache
    with torch.no_grad():
        net.arch[0, 2] += 1.0
    cached = margin_lower_bound(net, x, y, 0.03, method=method)
    fresh = op_net("mixed", 1, seed=5)
    with torch.no_grad():
        fresh.arch[0, 2] += 1.0
    assert torch.allclose(cached, margin_lower_bound(fresh, x, y, 0.03, method=method), atol=1e-5)


def test_cached_wrapper_sees_updated_batch_norm_statistics(x):
    y = torch.tensor([0, 1])
    net = op_net("sep_conv_3x3", 1, seed=2)
    margin_lower_bound(net, x, y, 0.03)  # trace and cache
    net.train()
    with torch.no_grad():
        net(torch.rand(16, 1, 8, 8) * 3)  # moves the running statistics
    net.eval()
    cached = margin_lower_bound(net, x, y, 0.03)
    fresh = op_net("sep_conv_3x3", 1, seed=2)
    fresh.load_state_dict(net.state_dict())
    assert torch.allclose(cached, margin_lower_bound(fresh, x, y, 0.03), atol=1e-5)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_training_mode_bounds_use_the_current_batch_statistics(method):
    net = op_net("sep_conv_3x3", 1, seed=3).train()
    y = torch.tensor([0, 1, 2, 3])
    for seed in (0, 1):  # a second batch must not reuse the first batch's statistics
        x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) ** (1 + 2 * seed)
        running = [b.clone() for b in net.buffers()]
        bound = margin_lower_bound(net, x, y, 0.0, method=method)
        assert all(torch.equal(a, b) for a, b in zip(running, net.buffers())), "bounds moved running stats"
        with torch.no_grad():
            out = net(x)
        margin = out.gather(1, y.view(-1, 1)).squeeze(1) - out.scatter(1, y.view(-1, 1), -math.inf).max(1).values
        assert torch.allclose(bound, margin, atol=1e-4), (bound, margin)


def _freeze_batch_statistics(net: nn.Module, x: torch.Tensor) -> None:
    """Turn training-mode batch norm on batch x into the eval-mode network with exactly the
    statistics that batch norm used on x (biased variance)."""
    stats = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: stats.__setitem__(
        m, (args[0].mean((0, 2, 3)), args[0].var((0, 2, 3), unbiased=False))))
        for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    for module, (mean, var) in stats.items():
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
    net.eval()


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_training_mode_bounds_are_sound(method):
    """In training mode the bounds hold for the network whose batch norm uses the clean batch's
    statistics (fixed): sample and attack that network."""
    from tests.violation import max_violation
    net = op_net("mixed", 2, seed=4).train()
    x = torch.rand(6, 1, 8, 8)
    lower, upper = compute_bounds(net, x, 0.05, method=method)
    _freeze_batch_statistics(net, x)
    with torch.no_grad():
        centre = net(x)
    assert (lower <= centre + 1e-5).all() and (centre <= upper + 1e-5).all()
    assert max_violation(net, x, 0.05, math.inf, lower.detach(), upper.detach(), samples=32, pgd_steps=15) <= 1e-5


def test_inputs_outside_the_unit_interval_are_rejected(net):
    with pytest.raises(BoundInputError, match=r"pixels in \[0, 1\]"):
        compute_bounds(net, torch.rand(2, 1, 8, 8) * 3 - 1, 0.1)


class _SubFirst(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.linear(((x - 0.5) * 2.0).flatten(1))


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_l2_ibp_refuses_an_input_that_does_not_enter_a_linear_layer_first(method):
    """auto_LiRPA 0.3 bounded the L2 ball as the centre point alone through an elementwise op (unsound)."""
    from verifiers.errors import UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="first Linear / Conv"):
        compute_bounds(_SubFirst(), torch.rand(2, 1, 4, 4), 0.1, norm="2", method=method)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_per_class_margin_bounds_hold_at_sampled_and_attacked_points(method):
    """margin_lower_bounds (the certified-training loss input): m_j <= logit_y - logit_j in the ball."""
    from tests.violation import pgd_attack
    from verifiers.bounds import margin_lower_bounds
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)).eval()
    x, y, eps = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 3]), 0.05
    bounds_ = margin_lower_bounds(net, x, y, eps, method=method).detach()
    assert (bounds_.gather(1, y.view(-1, 1)) == 0).all()
    points = [(x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1) for _ in range(64)]
    points.append(pgd_attack(net, x, y, eps, steps=30, restarts=1))
    with torch.no_grad():
        for point in points:
            logits = net(point)
            margins = logits.gather(1, y.view(-1, 1)) - logits
            assert (margins >= bounds_ - 1e-5).all()


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_bounds_are_computed_without_tf32_and_the_settings_are_restored(net, x, method, monkeypatch):
    """TF32 convolutions (PyTorch's default on recent GPUs) lose about three decimal digits: no bound may
    be computed with them. The flags are what torch reads on a GPU; here they are observed, not used."""
    seen = []
    original = lirpa.BoundedModule.compute_bounds

    def observed(self, *args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lirpa.BoundedModule, "compute_bounds", observed)
    from verifiers import crown
    tape = crown.linear_bound  # crown and alpha-crown may run on the tape engine instead

    def observed_tape(*args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return tape(*args, **kwargs)

    monkeypatch.setattr(crown, "linear_bound", observed_tape)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        margin_lower_bound(net.eval(), x, torch.tensor([0, 1]), 0.01, method=method)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert seen and all(flags == (False, False) for flags in seen)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_training_mode_per_sample_eps_bounds_the_whole_batch(norm):
    """A training-mode network is a function of its whole batch (batch norm's statistics). With one eps
    per sample, each row must be the row of the whole batch bounded at that row's eps (L2 IBP runs one
    batch per distinct radius: it once bounded each radius' rows alone, another network)."""
    net = op_net("sep_conv_3x3", 1, seed=3).train()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 3])
    eps = torch.tensor([0.01, 0.02, 0.01, 0.03]) * (1 if norm == "inf" else 10)
    mixed = margin_lower_bound(net, x, y, eps, norm=norm, method="ibp")
    for i in range(len(x)):
        uniform = margin_lower_bound(net, x, y, float(eps[i]), norm=norm, method="ibp")
        assert mixed[i].item() == pytest.approx(uniform[i].item(), rel=1e-5, abs=1e-5), (i, mixed, uniform)
