"""Certificates against float32 rounding (verifiers.rounding).

The truth here is exact rational arithmetic on the network's float32 parameters (fractions), which
trusts neither the bound code nor float arithmetic."""
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.verifiers.nets import op_net
from verifiers.bounds import box_bounds, margin_lower_bound
from verifiers.radius import certified_radius
from verifiers.rounding import RTOL, certified_margin, certified_slack, float64_copy, logit_scale
from verifiers.verify import Status, cascade, verify_methods
from verifiers.vnn import check_property
from verifiers.vnnlib import Clause, Property


def cancelling_net() -> nn.Sequential:
    """logit_0 = relu(1e4 x + 0.1) - relu(1e4 x), logit_1 = 0.1 + 1e-5: for x in (0, 1) the true margin of
    class 0 is -1e-5, but float32 rounds 1e4 x + 0.1 by up to 2.4e-4, so float32 often finds it positive."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1e4], [1e4]]))
        net[0].bias.copy_(torch.tensor([0.1, 0.0]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([0.0, 0.1 + 1e-5]))
    return net.eval()


def exact_margin(net: nn.Sequential, value: float) -> Fraction:
    """logit_0 - logit_1 at x = value, in exact arithmetic on the float32 parameters."""
    f = lambda t: [[Fraction(float(v)) for v in row] for row in t.detach().reshape(t.shape[0], -1).tolist()]
    w1, b1, w2, b2 = f(net[0].weight), f(net[0].bias), f(net[2].weight), f(net[2].bias)
    x = Fraction(float(value))
    hidden = [max(w1[i][0] * x + b1[i][0], Fraction(0)) for i in range(2)]
    logits = [sum(w2[k][i] * hidden[i] for i in range(2)) + b2[k][0] for k in range(2)]
    return logits[0] - logits[1]


@pytest.fixture
def fooled():
    """Inputs where float32 IBP certifies class 0 although its exact margin is negative."""
    net = cancelling_net()
    x = torch.linspace(0.2, 0.9, 200).view(-1, 1)
    y = torch.zeros(len(x), dtype=torch.long)
    truth = np.array([float(exact_margin(net, v)) for v in x.flatten().tolist()])
    float32 = margin_lower_bound(net, x, y, 0.0, method="ibp").detach().numpy()
    wrong = (float32 > 0) & (truth < 0)
    assert wrong.sum() >= 20  # the premise: plain float32 bounds give false certificates here
    keep = torch.from_numpy(wrong)
    return net, x[keep], y[keep]


def test_float32_margins_that_only_rounding_makes_positive_are_not_certificates(fooled):
    net, x, y = fooled
    counts = {}
    margins = certified_margin(net, x, y, 0.0, method="ibp", counts=counts)
    assert (margins <= 0).all()
    assert counts == {"rechecked": len(x), "rejected": len(x)}


def test_verify_certifies_none_of_them_and_reports_the_recheck(fooled):
    net, x, y = fooled
    rounding = {}
    results = verify_methods(net, x, y, 0.0, methods=["ibp"], rounding=rounding)
    assert all(r.status is not Status.CERTIFIED for r in results)
    assert rounding == {"ibp": {"rechecked": len(x), "rejected": len(x)}}


def test_the_cascade_reports_the_recheck_of_each_method_it_ran(fooled):
    net, x, y = fooled
    rounding = {}
    results = cascade(net, x, y, 0.0, methods=["ibp", "crown"], rounding=rounding)
    assert all(r.status is not Status.CERTIFIED for r in results)
    # Which float32 margins come out positive depends on the batch they are computed in (the cascade bounds
    # in batches of its own; another CPU rounds them otherwise), so the counts are not compared with a
    # recomputation. What holds on any host: both methods ran, every margin rechecked was rejected (every
    # exact margin is negative), and IBP rechecked some (a float32 margin was positive for it to be rechecked).
    undecided = sum(r.method == "-" for r in results)
    assert set(rounding) == {"ibp", "crown"}
    for method, counts in rounding.items():
        assert counts.get("rechecked", 0) == counts.get("rejected", 0) <= undecided, (method, counts)
    assert rounding["ibp"]["rechecked"] > 0


def test_radius_certifies_none_of_them(fooled):
    net, x, y = fooled
    assert (certified_radius(net, x, y, method="ibp", eps_max=0.1, steps=4) == 0).all()


def test_a_margin_that_is_truly_positive_stays_certified_after_the_float64_recheck():
    net = cancelling_net()
    with torch.no_grad():
        net[2].bias[1] = 0.1 - 1e-4  # true margin +1e-4: below the float32 tolerance, so rechecked
    x = torch.linspace(0.2, 0.9, 50).view(-1, 1)
    y = torch.zeros(len(x), dtype=torch.long)
    assert all(exact_margin(net, v) > 0 for v in x.flatten().tolist())
    plain = margin_lower_bound(net, x, y, 0.0, method="ibp").detach()
    counts = {}
    margins = certified_margin(net, x, y, 0.0, method="ibp", counts=counts)
    # float32 finds some of them positive (those are rechecked and kept) and some negative (left as they are)
    assert counts == {"rechecked": int((plain > 0).sum()), "rejected": 0} and counts["rechecked"] > 10
    assert (margins[plain > 0] > 0).all() and (margins[plain > 0] < RTOL * logit_scale(net, x)[plain > 0]).all()


def test_margins_far_from_zero_are_returned_unchanged():
    net = op_net("sep_conv_3x3", 1).eval()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    plain = margin_lower_bound(net, x, y, 0.001, method="crown-ibp")
    counts = {}
    checked = certified_margin(net, x, y, 0.001, method="crown-ibp", counts=counts)
    far = (plain <= 0) | (plain > RTOL * logit_scale(net, x))
    assert far.all() and counts == {}
    assert torch.equal(plain.detach(), checked)


def test_the_float64_copy_follows_changes_to_the_model():
    net = cancelling_net()
    first = float64_copy(net)
    assert float64_copy(net) is first and first[0].weight.dtype == torch.float64
    with torch.no_grad():
        net[2].bias[1] = 5.0
    second = float64_copy(net)
    assert second is not first and float(second[2].bias[1]) == 5.0


def test_a_float64_copy_of_a_network_with_native_pooling_bounds_like_the_original():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                        nn.MaxPool2d(3, 1, 1), nn.Flatten(), nn.Linear(2 * 36, 3)).eval()
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1])
    for method in ("ibp", "crown"):
        low32 = margin_lower_bound(net, x, y, 0.01, method=method)
        low64 = margin_lower_bound(float64_copy(net), x.double(), y, 0.01, method=method)
        assert torch.allclose(low32.double(), low64, rtol=1e-4, atol=1e-5)


def test_a_vnnlib_row_proven_only_by_rounding_is_not_proven():
    """The unsafe set "y0 - y1 <= 0" at the single input 0.3 holds exactly (margin -1e-5), so "unsat" would
    be false; float32 evaluates y0 - y1 as positive, so no attack finds it and only the bound decides."""
    net = cancelling_net()
    box = (torch.full((1, 1), 0.3), torch.full((1, 1), 0.3))
    assert exact_margin(net, 0.3) < 0
    C = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    b = torch.tensor([0.0], dtype=torch.float64)
    plain, _ = box_bounds(net, *box, C=C.float(), method="ibp")
    assert float(plain) > 0  # the premise: float32 alone proves the row
    assert float(certified_slack(net, *box, C, b, method="ibp")[0]) <= 0
    prop = Property(lower=np.array([0.3]), upper=np.array([0.3]),
                    clauses=[Clause(A=np.array([[1.0, -1.0]]), b=np.array([0.0]))], num_outputs=2)
    result = check_property(net, prop, (1, 1), methods=["ibp"], timeout=30, restarts=1, steps=5)
    assert result.verdict != "unsat", result
