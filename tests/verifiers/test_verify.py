"""The verification runner: radii never above the exact MILP radius, monotone in eps, cascade statuses,
and the soundness guard stops on a false certificate."""

import pytest
import torch
import torch.nn as nn

from tests.violation import pgd_attack
from verifiers import verify as verify_module
from verifiers.errors import BoundInputError, UnsupportedModelError
from verifiers.verify import (SoundnessError, Status, VerifyOptions, attack_radius, cascade, parse_methods, radii, relu_neurons,
                              verify_methods)


def _tiny(seed: int):
    """A random 16-8-8-4 ReLU MLP and 6 inputs labelled by its own predictions (all clean-correct)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.rand(6, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _falsifier(model):
    def attack(x, y, eps):
        torch.manual_seed(0)
        return pgd_attack(model, x, y, eps, steps=40, restarts=2)
    return attack


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_certified_radius_is_at_most_the_exact_milp_radius(seed):
    model, x, y = _tiny(seed)
    found = radii(model, x, y, methods=["ibp", "crown-ibp", "crown", "alpha-crown", "milp"], eps_max=0.5, steps=10,
                  falsifier=_falsifier(model), options=VerifyOptions(milp_time_limit=30))
    exact = {r.index: r.radius for r in found if r.method == "milp"}
    upper = attack_radius(model, x, y, _falsifier(model), eps_max=0.5, steps=10)
    tolerance = 0.5 / 2 ** 10
    for r in found:
        assert r.radius <= exact[r.index] + tolerance, (r.method, r.index, r.radius, exact[r.index])
    for i in range(len(x)):
        assert exact[i] <= float(upper[i]) + 1e-9  # exact radius never above an attack radius
    assert max(exact.values()) > 0


def test_verified_accuracy_is_monotone_in_eps_and_below_clean():
    model, x, y = _tiny(3)
    previous = {m: 1.0 for m in ("ibp", "crown-ibp", "crown", "milp")}
    for eps in (0.0, 0.01, 0.03, 0.1, 0.3):
        results = verify_methods(model, x, y, eps, methods=list(previous), falsifier=_falsifier(model))
        for method in previous:
            accuracy = sum(r.status is Status.CERTIFIED for r in results if r.method == method) / len(x)
            assert accuracy <= previous[method] + 1e-12, (method, eps)
            previous[method] = accuracy


def test_cascade_decides_every_sample_of_a_tiny_network_with_milp():
    model, x, y = _tiny(4)
    y = y.clone()
    y[0] = (y[0] + 1) % 4  # one misclassified sample
    results = cascade(model, x, y, 0.05, falsifier=_falsifier(model), options=VerifyOptions(milp_time_limit=30))
    assert results[0].status is Status.FALSIFIED and results[0].method == "clean"
    assert all(r.status is not Status.UNKNOWN for r in results)  # milp is complete
    for r in results:
        if r.status is Status.CERTIFIED:
            assert r.margin_bound > 0 and r.method in ("ibp", "crown-ibp", "crown", "alpha-crown", "milp")


def test_soundness_guard_stops_on_a_false_certificate(monkeypatch):
    model, x, y = _tiny(5)

    def lying_bound(model, x, y, eps, **kwargs):
        return torch.ones(len(x))  # "certified" at any eps

    monkeypatch.setattr(verify_module, "certified_margin", lying_bound)
    with pytest.raises(SoundnessError, match=r"sample \d+: method ibp certified eps 0\.5"):
        verify_methods(model, x, y, 0.5, methods=["ibp"], falsifier=_falsifier(model))


def test_crown_refuses_large_networks_and_milp_refuses_unsupported_ones():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 300), nn.ReLU(), nn.Linear(300, 4)).eval()
    x, y = torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    assert relu_neurons(model, x) == 300
    with pytest.raises(UnsupportedModelError, match="crown-max-relus 100"):
        verify_methods(model, x, y, 0.01, methods=["crown"], options=VerifyOptions(crown_max_relus=100))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 4)).eval()
    with pytest.raises(UnsupportedModelError, match="MILP supports"):
        verify_methods(conv, x, y, 0.01, methods=["milp"])
    with pytest.raises(UnsupportedModelError, match="L-inf"):
        verify_methods(_tiny(0)[0], x, y, 0.01, methods=["milp"], norm="2")
    assert parse_methods("all")[0] == "ibp"


def test_log_space_radius_is_certified_where_returned_and_close_to_the_linear_bisection():
    from verifiers.bounds import margin_lower_bound
    from verifiers.radius import certified_radius
    model, x, y = _tiny(6)
    linear = certified_radius(model, x, y, method="crown-ibp", eps_max=0.5, steps=20)
    log = certified_radius(model, x, y, method="crown-ibp", eps_max=0.5, steps=12, eps_min=1e-6)
    positive = log > 0
    assert positive.any()
    bound = margin_lower_bound(model, x[positive], y[positive], log[positive], method="crown-ibp")
    assert (bound > 0).all()  # every returned radius is certified
    factor = (0.5 / 1e-6) ** (1 / 2 ** 12)
    assert torch.allclose(log[positive], linear[positive], rtol=factor - 1 + 1e-4)


def test_crown_bounds_fewer_samples_at_once_on_large_networks_with_the_same_results(monkeypatch):
    model, x, y = _tiny(3)
    assert verify_module.method_batch_size(model, x, "crown", 64) == 64  # 16 ReLUs
    assert verify_module.method_batch_size(model, x, "ibp", 64) == 64
    together = verify_methods(model, x, y, 0.05, methods=["crown"])
    calls = []
    original = verify_module.certified_margin
    monkeypatch.setattr(verify_module, "certified_margin", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    monkeypatch.setattr(verify_module, "CROWN_BATCH_RELUS", 40)  # 16 ReLUs per sample: 2 samples at once
    assert verify_module.method_batch_size(model, x, "crown", 64) == 2
    assert verify_module.method_batch_size(model, x, "crown-ibp", 64) == 64
    apart = verify_methods(model, x, y, 0.05, methods=["crown"])
    assert calls == [2, 2, 2]
    assert [r.margin_bound for r in apart] == pytest.approx([r.margin_bound for r in together], abs=1e-5)


def test_norms_and_methods_are_closed_sets():
    import math as _math
    from verifiers.bounds import BoundMethod, Norm, parse_norm
    from verifiers.verify import METHODS, REGISTRY, get_method
    assert parse_norm("linf") is Norm.LINF and parse_norm(2) is Norm.L2 and parse_norm(Norm.L2) is Norm.L2
    assert Norm.LINF == _math.inf and str(Norm.L2) == "2"
    with pytest.raises(BoundInputError, match="supported norms: inf, 2"):
        parse_norm("l1")
    assert METHODS == ("ibp", "crown-ibp", "crown", "alpha-crown", "bab", "milp")  # the cascade order
    assert {m.bound for m in REGISTRY.values() if m.bound is not None} == set(BoundMethod)
    assert [m.name for m in REGISTRY.values() if m.exact] == ["milp"]
    with pytest.raises(BoundInputError, match="known: ibp, crown-ibp, crown, alpha-crown, bab, milp, all"):
        get_method("crwn")
    with pytest.raises(BoundInputError, match="unknown method 'crwn'"):
        parse_methods("ibp,crwn")


@pytest.mark.parametrize("log", [False, True])
def test_radius_below_attack_radii_is_certified_and_resolves_finer(log):
    """Bisecting below each sample's attack radius: every radius is one whose margin bound is positive,
    none exceeds the attack radius, and none is coarser than the [0, eps_max] bisection's."""
    from verifiers.bounds import margin_lower_bound
    from verifiers.radius import certified_radius
    model, x, y = _tiny(5)
    eps_min = 1e-4 if log else 0.0
    upper = attack_radius(model, x, y, _falsifier(model), eps_max=0.5, steps=10)
    attacked = upper < 0.5
    assert attacked.any()
    wide = certified_radius(model, x, y, method="crown", eps_max=0.5, steps=6, eps_min=eps_min)
    narrow = certified_radius(model, x, y, method="crown", eps_max=upper, steps=6, eps_min=eps_min, attacked=attacked)
    assert (narrow <= upper + 1e-12).all()
    # the bracket's resolution (upper / 2**6, or a factor (upper / eps_min) ** (1 / 2**6)) is finer than
    # [0, eps_max]'s, and wide is a certified eps, so narrow is at most one resolution step below it
    below = narrow * (upper / eps_min) ** (1 / 64) if log else narrow + upper / 64
    assert (below >= wide - 1e-9).all(), (narrow, wide)
    positive = narrow > 0
    assert positive.any()
    bound = margin_lower_bound(model, x[positive], y[positive], narrow[positive], method="crown")
    assert (bound > 0).all()
    # radii bisects the bisection methods below the attack radii exactly like certified_radius ...
    found = radii(model, x, y, methods=["crown-ibp"], eps_max=0.5, steps=6, eps_min=eps_min,
                  falsifier=_falsifier(model), attack_upper=upper)
    expected = certified_radius(model, x, y, method="crown-ibp", eps_max=upper, steps=6, eps_min=eps_min,
                                attacked=attacked)
    assert [r.radius for r in found] == pytest.approx(expected.tolist())
    # ... and finds crown's by a root search within 1% of an eps that failed: at least the bisection's (1% slack)
    found = radii(model, x, y, methods=["crown"], eps_max=0.5, steps=6, eps_min=eps_min, falsifier=_falsifier(model),
                  attack_upper=upper)
    assert all(r.radius >= 0.99 * float(narrow[r.index]) and r.radius <= float(upper[r.index]) + 1e-12 for r in found)
    own = radii(model, x, y, methods=["crown"], eps_max=0.5, steps=6, eps_min=eps_min, falsifier=_falsifier(model))
    own_upper = attack_radius(model, x, y, _falsifier(model), eps_max=0.5, steps=6)  # what radii computes itself
    assert all(r.radius <= float(own_upper[r.index]) + 1e-12 for r in own)
