"""Full CROWN on the tape (verifiers.crown), checked by what does not trust it: sampled and PGD-searched points,
the exact MILP minimum on small networks, and auto_LiRPA's CROWN on the same networks."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.verifiers.nets import OPERATIONS, cell_net, op_net
from tests.violation import max_violation, pgd_attack
from verifiers import interval
from verifiers.bounds import compute_bounds, margin_lower_bound, margin_lower_bounds, margin_specification
from verifiers import crown
from verifiers.crown import CrownOptions, bounded_tape, linear_bound, merge_duplicates, trace
from verifiers.errors import BoundInputError
from verifiers.milp import exact_margin
from verifiers.perturbation import Perturbation
from verifiers.radius import RadiusSearch, _loss_model_root, _next_probe, certified_radius, crown_radius

EPS = {math.inf: 0.08, 2.0: 0.6}
NORMS = [math.inf, 2.0]
MODES = ["adaptive", "all", "none"]


def _inputs(seed=1, batch=2, channels=1, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, channels, size, size, generator=g)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.02])  # pixels at and near the [0, 1] edges
    return x


def _tolerance(*bounds):
    return 1e-5 * (1.0 + max(b.abs().max().item() for b in bounds))


def _logit_bounds(net, x, eps, norm, options):
    classes = net(x[:1]).shape[1]
    eye = torch.eye(classes).expand(len(x), classes, classes)
    bound = linear_bound(net, x, Perturbation.ball(norm, eps, x), torch.cat([eye, -eye], 1), options=options)
    return bound.lower[:, :classes], -bound.lower[:, classes:]


@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("op", list(OPERATIONS) + ["mixed"])
def test_crown_bounds_contain_every_sampled_and_attacked_output(op, stride, mode, norm):
    net = op_net(op, stride, seed=stride)
    x = _inputs()
    lower, upper = _logit_bounds(net, x, EPS[norm], norm, CrownOptions(backsubstitution=mode, probe_rows=1))
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
    violation = max_violation(net, x, EPS[norm], norm, lower, upper, samples=48, pgd_steps=25)
    assert violation <= _tolerance(lower, upper), f"{op} s{stride} {mode} {norm}: violated by {violation:.3g}"


@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
@pytest.mark.parametrize("reference", ["forward", "ibp"])
@pytest.mark.parametrize("op", list(OPERATIONS) + ["mixed", "cell"])
def test_full_backsubstitution_is_never_looser_than_auto_lirpa_crown(op, reference, norm):
    """Back-substituting every unstable neuron is CROWN; intersecting with the forward bounds only tightens."""
    net = cell_net(seed=2) if op == "cell" else op_net(op, 1, seed=3)
    x = _inputs(seed=4, batch=2, size=8)
    with torch.no_grad():
        y = net(x).argmax(1)
        theirs = margin_lower_bound(net, x, y, EPS[norm] / 4, norm=norm, method="crown", engine="lirpa")
        ours = margin_lower_bound(net, x, y, EPS[norm] / 4, norm=norm, method="crown", engine="tape")
    options = CrownOptions(backsubstitution="all", reference=reference)
    spec = margin_specification(y, net(x[:1]).shape[1])
    full = linear_bound(net, x, Perturbation.ball(norm, EPS[norm] / 4, x), spec, options=options).lower.min(1).values
    slack = 1e-4 * (1 + theirs.abs())
    assert (full >= theirs - slack).all(), (full, theirs)
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("kind,seed,eps", [("mlp", 0, 0.05), ("mlp", 1, 0.15), ("conv", 2, 0.05), ("conv", 3, 0.12)])
@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_tape_margin_never_exceeds_the_milp_optimum(kind, seed, eps, method):
    torch.manual_seed(seed)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)).eval()
        x = torch.rand(3, 8, generator=torch.Generator().manual_seed(seed))
    else:
        net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                            nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net = net.eval()
        x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = net(x).argmax(1)
        bound = margin_lower_bound(net, x, y, eps, method=method, engine="tape")
    for i in range(len(x)):
        exact = exact_margin(net, x[i], int(y[i]), eps)
        assert exact.optimal, exact.message
        assert bound[i].item() <= exact.margin + 1e-5 * (1 + abs(exact.margin)), (i, bound[i].item(), exact.margin)


@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
def test_a_bound_read_off_at_a_smaller_radius_holds_there(norm):
    net = cell_net(seed=5)
    x = _inputs(seed=6, batch=2)
    classes = 10
    eye = torch.eye(classes).expand(2, classes, classes)
    bound = linear_bound(net, x, Perturbation.ball(norm, EPS[norm], x), torch.cat([eye, -eye], 1))
    for fraction in (0.25, 0.6):
        eps = torch.full((2,), EPS[norm] * fraction)
        rows = bound.lower_at(eps)
        assert (rows >= bound.lower - 1e-5).all()  # a smaller ball, a bound at least as high
        lower, upper = rows[:, :classes], -rows[:, classes:]
        violation = max_violation(net, x, eps, norm, lower, upper, samples=48, pgd_steps=25)
        assert violation <= _tolerance(lower, upper)


@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
def test_largest_eps_is_where_the_read_off_bound_still_clears_the_threshold(norm):
    net = op_net("sep_conv_3x3", 1, seed=7)
    x = _inputs(seed=8, batch=3)
    with torch.no_grad():
        y = net(x).argmax(1)
    spec = margin_specification(y, 5)
    bound = linear_bound(net, x, Perturbation.ball(norm, EPS[norm], x), spec)
    threshold = torch.full((3,), 0.01)
    found = bound.largest_eps(threshold)
    clean = bound.lower_at(torch.zeros(3)).min(1).values
    for i in range(3):
        if clean[i] <= threshold[i]:
            assert found[i] == -1
            continue
        assert 0 <= found[i] <= EPS[norm]
        at = bound.lower_at(found.clamp_min(0)).min(1).values
        assert at[i] > threshold[i]
        if found[i] < EPS[norm]:  # a little further the bound no longer clears it
            beyond = bound.lower_at(found.clamp_min(0) * 1.001 + 1e-6).min(1).values
            assert beyond[i] <= threshold[i] + 1e-6


def test_bounds_from_a_larger_ball_are_a_sound_prior():
    net = cell_net(seed=9)
    x = _inputs(seed=10, batch=2)
    eye = torch.eye(10).expand(2, 10, 10)
    spec = torch.cat([eye, -eye], 1)
    wide = linear_bound(net, x, Perturbation.ball("inf", 0.08, x), spec)
    narrow = linear_bound(net, x, Perturbation.ball("inf", 0.05, x), spec, prior=wide.relu_bounds)
    lower, upper = narrow.lower[:, :10], -narrow.lower[:, 10:]
    assert max_violation(net, x, 0.05, math.inf, lower, upper, samples=48, pgd_steps=25) <= _tolerance(lower, upper)
    with pytest.raises(BoundInputError):
        linear_bound(net, x, Perturbation.ball("inf", 0.05, x), spec, prior=wide.relu_bounds[:-1])


def test_identical_operations_on_one_input_become_one_node():
    """Two edges applying the same max pool to one state: one ReLU relaxation, as auto_LiRPA's graph optimiser
    makes it; the merged tape still computes the model (at eps 0 the bounds are the logits)."""
    net = cell_net(seed=11, ops=("max_pool_3x3", "skip_connect", "dil_conv_3x3", "max_pool_3x3"))
    x = _inputs(seed=12, batch=2)
    out = trace(net, x, Perturbation.ball("inf", 0.01, x))
    before = {id(n) for n in _all_nodes(out.node)}
    nodes, _ = merge_duplicates(out.node)
    relus = [n for n in nodes if n.kind == "relu"]
    assert len(nodes) < len(before) and len({id(n.parents[0]) for n in relus}) == len(relus)
    with torch.no_grad():
        logits = net(x)
    lower, upper = _logit_bounds(net, x, 0.0, math.inf, CrownOptions())
    assert torch.allclose(lower, logits, atol=1e-4) and torch.allclose(upper, logits, atol=1e-4)


def _all_nodes(output):
    seen, stack = {}, [output]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen[id(node)] = node
            stack.extend(node.parents)
    return list(seen.values())


def test_channels_last_back_substitution_gives_the_same_bounds(monkeypatch):
    net = cell_net(seed=13)
    x = _inputs(seed=14, batch=2)
    options = CrownOptions(backsubstitution="all")
    monkeypatch.setattr(interval, "CHANNELS_LAST_ROWS", 1)
    fast = _logit_bounds(net, x, 0.05, math.inf, options)
    monkeypatch.setattr(interval, "CHANNELS_LAST_ROWS", 0)
    plain = _logit_bounds(net, x, 0.05, math.inf, options)
    for a, b in zip(fast, plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
@pytest.mark.parametrize("op,stride", [("sep_conv_5x5", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 2), ("mixed", 1),
                                       ("cell", 1)])
def test_windowed_back_substitution_equals_the_full_map(op, stride, norm, monkeypatch):
    """Neurons taken tile by tile and back-substituted as windows of their map give the bounds the full map gives,
    every ReLU of the network, on the same relaxations (strides, dilation, groups, padding, pooling, cat)."""
    net = cell_net(seed=19) if op == "cell" else op_net(op, stride, seed=20, channels=3)
    x = _inputs(seed=21, batch=2, size=10)
    ball = Perturbation.ball(norm, EPS[norm] / 2, x)
    tape = bounded_tape(net, x, ball, options=CrownOptions(backsubstitution="none"))
    windows = []
    real = interval._conv_backward_window
    monkeypatch.setattr(interval, "_conv_backward_window", lambda *a: windows.append(1) or real(*a))
    for relu in tape.relus:
        node = relu.parents[0]
        index = torch.arange(math.prod(node.shape))
        full = crown._backward_bounds(node, index, ball, x, 2, 16, tile=0)
        for tile, chunk in ((1, 16), (3, 5)):
            part = crown._backward_bounds(node, index, ball, x, 2, chunk, tile=tile)
            for a, b in zip(part, full):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * (1 + b.abs().max().item())), (op, tile)
    assert windows, "no window was back-substituted"


@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
def test_windowed_crown_bounds_contain_every_sampled_and_attacked_output(norm):
    net = cell_net(seed=22)
    x = _inputs(seed=23, size=10)
    options = CrownOptions(backsubstitution="all", chunk_rows=7, window_tile=2)
    lower, upper = _logit_bounds(net, x, EPS[norm], norm, options)
    violation = max_violation(net, x, EPS[norm], norm, lower, upper, samples=48, pgd_steps=25)
    assert violation <= _tolerance(lower, upper)


def test_the_root_predicted_from_the_first_order_bound_and_two_probes_is_exact_on_that_shape():
    """On a margin curve that is a first-order bound minus a power of eps (the shape the search models), two
    probes predict the root; each next probe lies strictly inside the bracket."""
    first_order = lambda eps: 3.0 - 40.0 * eps
    curve = lambda eps: first_order(eps) - 2.5e4 * eps ** 1.7
    root = 0.0
    for _ in range(60):  # the true root by bisection
        root = root if curve(root + 0.01 / 2 ** _) <= 0 else root + 0.01 / 2 ** _
    probes = [(0.0, curve(0.0)), (0.001, curve(0.001)), (0.009, curve(0.009))]
    low, high = 0.001, 0.009
    assert curve(low) > 0 >= curve(high)
    predicted = _loss_model_root(probes, low, high, first_order)
    assert abs(predicted - root) <= 1e-6 * root
    for fo in (first_order, None):
        nxt = _next_probe(probes, low, high, 0.01, fo)
        assert low < nxt < high
    assert _loss_model_root([(0.0, 3.0), (0.001, 5.0)], 0.001, 1.0, first_order) is None  # above the first-order bound


def test_a_closing_probe_that_did_not_close_keeps_closing_where_the_margin_shrank_and_halves_at_a_cliff():
    """Probes as full CROWN gave them on two cpu-scale table networks. Smooth (DSRNA-CB, digit 6, L2): the last
    closing probe certified with a tenth of the margin before it, so the root lies just above it: the next probe
    closes the bracket (a log-space halving there cost 5 more passes). Cliff (DARTS, digit 6, L-inf): two closing
    probes certified with their margin barely changed, far below the failed probe: the next probe halves the
    bracket in log space instead of creeping on by the tolerance."""
    step = 1 - 0.9 * 0.01
    smooth = [(0.0, 3.23), (0.01068, -4.4), (0.006959, 0.495), (0.007498, 0.0655), (0.007566, 0.00601)]
    cliff = [(0.0, 4.55), (0.0005493, 4.38), (0.003543, -91.9), (0.001533, 3.66), (0.001734, 3.34), (0.00175, 3.31)]
    for first_order in (None, lambda eps: 3.3 - 60 * eps):
        low, high = 0.007566, 0.01068
        assert low < _next_probe(smooth, low, high, 0.01, first_order) <= low / step
        low, high = 0.00175, 0.003543
        assert abs(_next_probe(cliff, low, high, 0.01, first_order) - math.sqrt(low * high)) <= 1e-12


@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
def test_the_crown_radius_is_sound_and_as_large_as_bisection_finds(norm):
    net = op_net("dil_conv_3x3", 1, seed=15)
    x = _inputs(seed=16, batch=3)
    with torch.no_grad():
        y = net(x).argmax(1)
    upper = torch.full((3,), 4 * EPS[norm])
    found, traces = crown_radius(net, x, y, norm=norm, upper=upper, search=RadiusSearch(relative_tolerance=0.01))
    with torch.no_grad():
        bisected = certified_radius(net, x, y, norm=norm, method="crown", eps_max=upper, steps=14)
    first = next(t for t in traces if len(t.probes) > 1)  # the first probe: a norm's fraction of the limit
    assert first.probes[1][0] == pytest.approx(float(upper[0]) * (1 / 64 if norm == math.inf else 1 / 256))
    for i in range(3):
        assert traces[i].radius == float(found[i]) and found[i] <= upper[i]
        assert found[i] >= 0.98 * bisected[i] - 1e-6, (i, float(found[i]), float(bisected[i]))
        assert traces[i].failed >= traces[i].radius
    certified = found > 0
    if certified.any():  # no attack breaks a certified radius
        adv = pgd_attack(net, x[certified], y[certified], found[certified], norm, steps=40, restarts=2)
        with torch.no_grad():
            assert (net(adv).argmax(1) == y[certified]).all()
        with torch.no_grad():  # and the tape's own bound certifies it
            margin = margin_lower_bound(net, x[certified], y[certified], found[certified], norm=norm,
                                        method="crown", engine="tape")
        assert (margin > 0).all()


def test_bad_options_are_refused_in_one_line():
    with pytest.raises(BoundInputError, match="backsubstitution"):
        CrownOptions(backsubstitution="some")
    with pytest.raises(BoundInputError, match="reference"):
        CrownOptions(reference="exact")
    with pytest.raises(BoundInputError):
        CrownOptions(chunk_rows=0)
    with pytest.raises(BoundInputError):
        RadiusSearch(relative_tolerance=0)
    net = op_net("skip_connect", 1)
    x = _inputs()
    with pytest.raises(BoundInputError, match="spec"):
        linear_bound(net, x, Perturbation.ball("inf", 0.01, x), torch.zeros(3, 2, 5))


def test_compute_bounds_on_the_tape_and_on_auto_lirpa_agree_on_a_cell():
    """The default (adaptive) tape bounds skip back-substitution where a sample of rows gained little, so they
    may be a little looser than full CROWN, or tighter (forward bounds intersected): close, not equal."""
    net = cell_net(seed=17)
    x = _inputs(seed=18, batch=2)
    with torch.no_grad():
        tape = compute_bounds(net, x, 0.03, method="crown", engine="tape")
        lirpa = compute_bounds(net, x, 0.03, method="crown", engine="lirpa")
    for ours, theirs in zip(tape, lirpa):
        assert ((ours - theirs).abs() <= 0.01 * (1 + theirs.abs())).all()


@pytest.mark.parametrize("norm", NORMS, ids=["linf", "l2"])
def test_a_per_channel_scale_convolution_is_bounded_as_the_affine_map_it_is(norm):
    """A depthwise 1x1 convolution (input normalisation; here with negative scales too) is recorded as an affine
    node: IBP / CROWN-IBP equal auto_LiRPA's convolution bounds, full CROWN is never looser and holds on sampled
    and attacked points; a network whose first layers are all linear starts full CROWN's forward mode exact."""
    torch.manual_seed(5)
    scale = nn.Conv2d(3, 3, 1, groups=3)
    with torch.no_grad():
        scale.weight.copy_(torch.tensor([2.0, -0.5, 1.5]).view(3, 1, 1, 1))
    net = nn.Sequential(scale, nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 6),
                        nn.ReLU(), nn.Linear(6, 5)).eval()
    x = _inputs(seed=6, channels=3)
    eps = EPS[norm] / 4
    with torch.no_grad():
        y = net(x).argmax(1)
        if norm == math.inf:
            bounds = interval.interval_margins(net, x, y, eps, crown_ibp=True)
            tape = interval.Interval.from_ball(x, eps)
            assert net[0](tape).node.kind == "affine"
            for method, ours in (("ibp", bounds.ibp), ("crown-ibp", bounds.crown_ibp)):
                theirs = margin_lower_bounds(net, x, y, eps, method=method, engine="lirpa")
                assert torch.allclose(ours, theirs, atol=1e-5 * (1 + theirs.abs().max().item())), method
        theirs = margin_lower_bound(net, x, y, eps, norm=norm, method="crown", engine="lirpa")
        ours = margin_lower_bound(net, x, y, eps, norm=norm, method="crown", engine="tape")
    assert (ours >= theirs - 1e-4 * (1 + theirs.abs())).all(), (ours, theirs)
    lower, upper = _logit_bounds(net, x, eps, norm, CrownOptions(backsubstitution="all"))
    violation = max_violation(net, x, eps, norm, lower, upper, samples=48, pgd_steps=25)
    assert violation <= _tolerance(lower, upper)


def _relaxed_state(shape, size, g, batch=2):
    """A forward-mode state (Lw, Lb, Uw, Ub) over inputs in [-1, 1]^size with L(x) <= U(x) there and L != U."""
    Lw, Lb = torch.randn(batch, size, *shape, generator=g, dtype=torch.float64), \
        torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    spread = 0.3 * torch.randn(batch, size, *shape, generator=g, dtype=torch.float64)
    gap = spread.abs().sum(1) + torch.rand(batch, *shape, generator=g, dtype=torch.float64)
    return Lw, Lb, Lw + spread, Lb + gap


@pytest.mark.parametrize("kind", ["linear", "conv", "affine", "shift-only", "sum", "difference", "cat", "reshape"])
def test_a_forward_step_bounds_its_node_at_every_point_between_the_parents_bounds(kind):
    """One linear node's forward-mode bounds hold for the node's own operation (torch, not the bound code) applied
    to sampled points between its parents' relaxed bounds, and equal it on exact (unrelaxed) parents."""
    from verifiers.crown import _forward_step
    from verifiers.interval import Node
    g = torch.Generator().manual_seed(3)
    size, batch = 3, 2
    weight = torch.randn(4, 5, generator=g, dtype=torch.float64)
    kernel = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    scale = torch.tensor([1.5, -0.7], dtype=torch.float64).view(2, 1, 1)          # both signs
    shift = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    image, vector = (2, 4, 4), (5,)
    parent_shapes, data, shape, apply = {
        "linear": ([vector], {"weight": weight, "bias": bias}, (4,), lambda z: z[0] @ weight.T + bias),
        "conv": ([image], {"weight": kernel, "bias": bias[:3], "stride": 1, "padding": 1, "dilation": 1, "groups": 1},
                 (3, 4, 4), lambda z: F.conv2d(z[0], kernel, bias[:3], 1, 1)),
        "affine": ([image], {"scale": scale, "shift": shift}, image, lambda z: z[0] * scale + shift),
        "shift-only": ([image], {"scale": None, "shift": shift}, image, lambda z: z[0] + shift),
        "sum": ([image, image], {"signs": (1.0, 1.0)}, image, lambda z: z[0] + z[1]),
        "difference": ([image, image], {"signs": (1.0, -1.0)}, image, lambda z: z[0] - z[1]),
        "cat": ([image, (1, 4, 4)], {"dim": 1, "sizes": (2, 1)}, (3, 4, 4), lambda z: torch.cat(z, 1)),
        "reshape": ([image], {}, (32,), lambda z: z[0].reshape(batch, 32)),
    }[kind]
    parents = [Node("input", (), {}, s) for s in parent_shapes]
    node = Node(kind.replace("shift-only", "affine").replace("difference", "sum"), tuple(parents), data, shape)
    states = {p: _relaxed_state(p.shape, size, g, batch) for p in parents}
    Lw, Lb, Uw, Ub = _forward_step(node, states, batch, size)

    def value(w, b, x):  # a forward-mode function at input points x (N, B, size)
        return torch.einsum("nbd,bd...->nb...", x, w) + b
    x = 2 * torch.rand(64, batch, size, generator=g, dtype=torch.float64) - 1
    points = []
    for p in parents:
        low, high = value(*states[p][:2], x), value(*states[p][2:], x)
        points.append(low + torch.rand(low.shape, generator=g, dtype=torch.float64) * (high - low))
    out = torch.stack([apply([z[n] for z in points]) for n in range(len(x))])
    assert (value(Lw, Lb, x) <= out + 1e-9).all() and (out <= value(Uw, Ub, x) + 1e-9).all()
    assert (value(Uw, Ub, x) - value(Lw, Lb, x)).max() > 1e-3                 # relaxed: not a point
    exact = {p: (s[0], s[1], s[0], s[1]) for p, s in states.items()}
    Ew, Eb, Fw, Fb = _forward_step(node, exact, batch, size)
    assert Ew is Fw and Eb is Fb
    expected = torch.stack([apply([value(*exact[p][:2], x)[n] for p in parents]) for n in range(len(x))])
    assert torch.allclose(value(Ew, Eb, x), expected, atol=1e-9)
