"""Branch and bound (verifiers.bab), checked by what does not trust it: the exact MILP minimum decides every
verdict on small networks, points inside each bounded subdomain never go below its bound, planted
counterexamples are found, and the deadline holds."""
import math
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from tests.violation import random_points
from verifiers.bab import (BabOptions, Domain, Specification, _bound_domains, input_branch_and_bound,
                           relu_branch_and_bound, tighten_relu_bounds)
from verifiers.crown import bounded_tape
from verifiers.errors import BoundInputError
from verifiers.milp import exact_minimum
from verifiers.perturbation import Perturbation
from verifiers.vnn import check_property
from verifiers.vnnlib import Clause, Property


def _mlp(seed: int, inputs: int = 6, hidden=(16, 16), outputs: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, width = [], inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, outputs)).eval()


def _margin_spec(label: int, outputs: int) -> Specification:
    rows = torch.stack([torch.eye(outputs)[label] - torch.eye(outputs)[j] for j in range(outputs) if j != label])
    return Specification(rows, torch.zeros(len(rows)), [[r] for r in range(len(rows))], torch.full((len(rows),), 1e-5))


def _exact(net, lower, upper, spec: Specification) -> float:
    """The exact minimum over the box of the worst clause's best row (every clause here is one row)."""
    return min(exact_minimum(net, lower[0], upper[0], spec.C[r].numpy(), time_limit=60).margin - float(spec.b[r])
               for r in range(spec.C.shape[0]))


def _box(seed: int, inputs: int, eps: float):
    x = torch.rand(1, inputs, generator=torch.Generator().manual_seed(seed))
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


@pytest.mark.parametrize("branching", ["babsr", "width"])
@pytest.mark.parametrize("seed", range(6))
def test_every_verdict_agrees_with_the_milp_minimum(seed, branching):
    net = _mlp(seed)
    lower, upper = _box(seed, 6, 0.0)
    with torch.no_grad():
        label = int(net((lower + upper) / 2).argmax())
    spec = _margin_spec(label, 3)
    # an eps per seed where the exact minimum is clearly positive or clearly negative
    for eps in (0.02, 0.06, 0.12, 0.25):
        lower, upper = _box(seed, 6, eps)
        exact = _exact(net, lower, upper, spec)
        if abs(exact) < 0.02:
            continue
        found = {}

        def falsify(candidates):
            with torch.no_grad():
                wrong = (net(candidates).argmax(1) != label).nonzero().flatten()
            return candidates[wrong[0]] if len(wrong) else None

        result = relu_branch_and_bound(net, lower, upper, spec, deadline=time.perf_counter() + 60,
                                       options=BabOptions(branching=branching, batch=8), falsify=falsify)
        found[eps] = result.verdict
        assert result.verdict == ("unsat" if exact > 0 else "sat"), (seed, eps, exact, result.verdict, result.log)
        if result.verdict == "sat":  # the counterexample lies in the box and is misclassified
            x = result.counterexample
            assert (x >= lower[0] - 1e-7).all() and (x <= upper[0] + 1e-7).all()
            with torch.no_grad():
                assert int(net(x.unsqueeze(0)).argmax()) != label
        else:
            assert result.proven_margin is not None and result.proven_margin <= exact + 1e-4


@pytest.mark.parametrize("tightened", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_points_of_a_subdomain_never_go_below_its_bound(seed, tightened):
    """A subdomain's beta-CROWN bound holds for every input of the box whose activations obey its splits (on
    the tape as CROWN leaves it, and after its intermediate bounds are optimised as branch and bound does)."""
    net = _mlp(seed + 10)
    lower, upper = _box(seed, 6, 0.2)
    spec = _margin_spec(0, 3)
    tape = bounded_tape(net, (lower + upper) / 2, Perturbation.input_box(lower, upper))
    if tightened:
        tighten_relu_bounds(tape, 20, 0.1, math.inf)
    unstable = [((n.data["lower"] < 0) & (n.data["upper"] > 0)).flatten().nonzero().flatten() for n in tape.relus]
    generator = torch.Generator().manual_seed(seed)
    domains = []
    for _ in range(6):  # random subdomains of 1-4 splits
        splits = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            layer = int(torch.randint(0, len(unstable), (1,), generator=generator))
            if len(unstable[layer]):
                neuron = int(unstable[layer][torch.randint(0, len(unstable[layer]), (1,), generator=generator)])
                if all((layer, neuron) != (s[0], s[1]) for s in splits):
                    splits.append((layer, neuron, 1 if torch.rand(1, generator=generator) < 0.5 else -1))
        domains.append(Domain(tuple(splits)))
    bounded = _bound_domains(tape, spec, domains, BabOptions(), 20, math.inf)
    points = random_points((lower + upper) / 2, ((upper - lower) / 2).max().view(1), math.inf, 4000, generator)
    points = torch.max(torch.min(points.view(-1, 6), upper), lower)
    with torch.no_grad():
        pre = []
        h = points
        for module in net:
            h = module(h)
            if isinstance(module, nn.Linear):
                pre.append(h)
        rows = h @ spec.C.T - spec.b
    for i, domain in enumerate(domains):
        inside = torch.ones(len(points), dtype=torch.bool)
        for layer, neuron, sign in domain.splits:
            inside &= (pre[layer][:, neuron] >= 0) if sign > 0 else (pre[layer][:, neuron] <= 0)
        if inside.any():
            assert (rows[inside] >= bounded.rows[i] - 1e-5).all(), (domain.splits, rows[inside].min(0), bounded.rows[i])


@pytest.mark.parametrize("seed", range(3))
def test_optimised_intermediate_bounds_hold_below_the_exact_minimum_and_only_tighten(seed):
    """Each ReLU input's optimised bounds: never looser than CROWN's, never past the exact MILP minimum /
    maximum of that neuron over the box (the network cut after its layer), never past sampled points, and
    tighter than CROWN's somewhere (the optimisation does something)."""
    net = _mlp(seed + 30, inputs=6, hidden=(16, 16, 16), outputs=3)
    lower, upper = _box(seed, 6, 0.15)
    tape = bounded_tape(net, (lower + upper) / 2, Perturbation.input_box(lower, upper))
    before = [(n.data["lower"].clone(), n.data["upper"].clone()) for n in tape.relus]
    tighten_relu_bounds(tape, 30, 0.1, math.inf)
    after = [(n.data["lower"], n.data["upper"]) for n in tape.relus]
    points = torch.max(torch.min(lower + (upper - lower) * torch.rand(4000, 6, generator=torch.Generator().manual_seed(seed)),
                                 upper), lower)
    gained = 0.0
    for layer, ((l0, u0), (l1, u1)) in enumerate(zip(before, after)):
        assert (l1 >= l0).all() and (u1 <= u0).all()
        gained += float((l1 - l0).sum() + (u0 - u1).sum())
        prefix = net[:2 * layer + 1]
        with torch.no_grad():
            z = prefix(points)
        assert (z >= l1 - 1e-5).all() and (z <= u1 + 1e-5).all()
        if layer == 0:
            continue
        width = prefix[-1].out_features
        for neuron in range(0, width, 3):
            c = np.eye(width)[neuron]
            low = exact_minimum(prefix, lower[0], upper[0], c, time_limit=30).margin
            high = -exact_minimum(prefix, lower[0], upper[0], -c, time_limit=30).margin
            assert float(l1[0, neuron]) <= low + 1e-4 and float(u1[0, neuron]) >= high - 1e-4, (layer, neuron)
    assert gained > 0


def test_a_planted_counterexample_is_found():
    """Output 1 beats output 0 only near one corner of the box (a narrow bump): random and PGD attacks started
    from the centre miss it easily; branch and bound must not call the property unsat."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[10.0, 10.0], [0.0, 0.0]]))
        net[0].bias.copy_(torch.tensor([-19.5, 1.0]))  # relu(10 (x0 + x1) - 19.5): positive only near (1, 1)
        net[2].weight.copy_(torch.tensor([[0.0, 1.0], [4.0, 0.0]]))  # y1 = 4 relu(...) > y0 = 1 iff x0 + x1 > 1.975
        net[2].bias.copy_(torch.tensor([0.0, 0.0]))
    lower, upper = torch.zeros(1, 2), torch.ones(1, 2)
    spec = Specification(torch.tensor([[1.0, -1.0]]), torch.zeros(1), [[0]], torch.full((1,), 1e-6))
    assert _exact(net, lower, upper, spec) < 0

    def falsify(candidates):
        with torch.no_grad():
            bad = (net(candidates) @ spec.C.T <= 0).flatten().nonzero().flatten()
        return candidates[bad[0]] if len(bad) else None

    for search in (relu_branch_and_bound, input_branch_and_bound):
        result = search(net, lower, upper, spec, deadline=time.perf_counter() + 30, falsify=falsify)
        assert result.verdict == "sat", (search.__name__, result.log)


@pytest.mark.parametrize("seed", range(3))
def test_input_splitting_agrees_with_the_milp_minimum(seed):
    net = _mlp(seed + 20, inputs=2, hidden=(12, 12), outputs=2)
    lower, upper = _box(seed, 2, 0.3)
    with torch.no_grad():
        label = int(net((lower + upper) / 2).argmax())
    spec = _margin_spec(label, 2)
    exact = _exact(net, lower, upper, spec)
    result = input_branch_and_bound(net, lower, upper, spec, deadline=time.perf_counter() + 60, options=BabOptions(batch=16))
    if exact > 1e-3:
        assert result.verdict == "unsat"
    elif exact < -1e-3:
        assert result.verdict != "unsat"


def test_the_deadline_holds():
    net = _mlp(3, inputs=20, hidden=(64, 64, 64), outputs=10)
    lower, upper = _box(0, 20, 0.5)
    spec = _margin_spec(0, 10)
    began = time.perf_counter()
    result = relu_branch_and_bound(net, lower, upper, spec, deadline=began + 2.0)
    assert time.perf_counter() - began < 4.0
    assert result.verdict in ("timeout", "unsat", "sat")


def test_vnnlib_decisions_with_bab_agree_with_milp():
    net = _mlp(7, inputs=6, hidden=(24, 24), outputs=3)
    for seed, eps in ((1, 0.05), (2, 0.3)):
        lower, upper = _box(seed, 6, eps)
        with torch.no_grad():
            label = int(net((lower + upper) / 2).argmax())
        # a clause describes a violation: y_label - y_j <= 0
        clauses = [Clause(A=np.eye(3)[[label]] - np.eye(3)[[j]], b=np.zeros(1)) for j in range(3) if j != label]
        prop = Property(lower=lower[0].double().numpy(), upper=upper[0].double().numpy(), clauses=clauses, num_outputs=3)
        exact = _exact(net, lower, upper, _margin_spec(label, 3))
        result = check_property(net, prop, (1, 6), methods=["ibp", "bab"], timeout=60, restarts=2, steps=10)
        if exact > 0.01:
            assert result.verdict == "unsat", (exact, result)
        elif exact < -0.01:
            assert result.verdict == "sat", (exact, result)


@pytest.mark.slow
def test_bab_per_sample_agrees_with_the_exact_milp_margin():
    """``--method bab`` (``bab_sample`` per sample in ``verify_methods``): where the exact MILP margin is clearly
    positive bab never falsifies, where it is clearly negative bab never certifies, a proven margin never exceeds
    the exact one and a counterexample's margin is negative; and bab decides most of them (a timeout is the only
    other answer)."""
    from verifiers.verify import Status, VerifyOptions, verify_methods
    net = _mlp(11, inputs=6, hidden=(24, 24), outputs=3)
    x = torch.rand(6, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = net(x).argmax(1)
    clear, decided = 0, 0
    for eps in (0.03, 0.3):
        results = verify_methods(net, x, y, eps, methods=["bab", "milp"], options=VerifyOptions(bab_time_limit=60))
        bab, milp = results[:len(x)], results[len(x):]
        assert [r.method for r in bab] == ["bab"] * len(x) and [r.method for r in milp] == ["milp"] * len(x)
        for b, m in zip(bab, milp):
            if abs(m.margin_bound) < 0.01:
                continue
            clear += 1
            if b.status is Status.UNKNOWN:
                continue
            decided += 1
            assert b.status is (Status.CERTIFIED if m.margin_bound > 0 else Status.FALSIFIED), (eps, b, m)
            if b.status is Status.CERTIFIED:
                assert b.margin_bound <= m.margin_bound + 1e-4
            else:
                assert b.margin_bound < 0
    assert clear >= 8 and decided >= clear - 1, (clear, decided)


def test_bad_options_are_refused():
    with pytest.raises(BoundInputError):
        BabOptions(batch=0)
    with pytest.raises(BoundInputError, match="branching"):
        BabOptions(branching="random")


def test_tightening_a_cell_with_parallel_branches_optimises_only_the_relus_a_layer_depends_on():
    """In a cell, an earlier ReLU may lie on a parallel branch: the layer's bound does not depend on its slopes
    (autograd refused them before). Tightening runs, only narrows the bounds, and branch and bound's verdict on
    the cell agrees with sampled points."""
    from tests.verifiers.nets import cell_net
    from verifiers.verify import bab_sample
    net = cell_net(seed=3)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    lower, upper = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    tape = bounded_tape(net, x, Perturbation.input_box(lower, upper))
    before = [(n.data["lower"].clone(), n.data["upper"].clone()) for n in tape.relus]
    tighten_relu_bounds(tape, 5, 0.1, math.inf)
    for (l0, u0), node in zip(before, tape.relus):
        assert (node.data["lower"] >= l0 - 1e-6).all() and (node.data["upper"] <= u0 + 1e-6).all()
    label = int(net(x).argmax(1))
    result = bab_sample(net, x, label, 0.02, 20.0)
    points = ((x - 0.02) + 0.04 * torch.rand(2000, 1, 8, 8, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    with torch.no_grad():
        wrong = bool((net(points).argmax(1) != label).any())
    assert result.verdict in ("unsat", "sat", "timeout") and not (result.verdict == "unsat" and wrong)
