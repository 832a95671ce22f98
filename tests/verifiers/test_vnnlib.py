"""VNNLIB properties: the parser (subset, errors naming the line), and decisions on ONNX networks that the
tests know the answer to: unsat at a tiny box (checked by sampling), sat with a counterexample that
onnxruntime confirms, MILP minima checked against the network, the timeout, and the soundness guard."""
import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn as nn

from tests.verifiers.onnx_nets import export, networks, robustness_property
from verifiers import vnn as vnn_module
from verifiers.milp import exact_minimum
from verifiers.onnx_model import load_onnx
from verifiers.verify import SoundnessError
from verifiers.vnn import check_property
from verifiers.vnnlib import VnnlibError, parse_vnnlib

NETWORKS = networks()
HEADER = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
BOX = "(assert (>= X_0 0.0))\n(assert (<= X_0 1.0))\n(assert (and (<= X_1 0.5) (>= X_1 -0.5)))\n"


def _write(tmp_path, text, name="p.vnnlib"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_parser_reads_the_box_and_the_output_constraints_as_clauses(tmp_path):
    text = HEADER + "; a comment\n" + BOX + \
        "(assert (or (and (>= Y_0 Y_1) (<= (+ Y_0 (* 2 Y_1)) 3)) (and (> (- Y_1 0.5) Y_0))))\n(assert (<= Y_0 10))\n"
    prop = parse_vnnlib(_write(tmp_path, text), num_inputs=2, num_outputs=2)
    assert prop.lower.tolist() == [0.0, -0.5] and prop.upper.tolist() == [1.0, 0.5]
    assert len(prop.clauses) == 2  # (A or B) and C -> (A and C) or (B and C)
    assert prop.violated_by(np.array([2.0, 0.0]))       # Y_0 >= Y_1, Y_0 + 2 Y_1 <= 3, Y_0 <= 10
    assert prop.violated_by(np.array([0.0, 1.0]))       # Y_1 - 0.5 > Y_0
    assert not prop.violated_by(np.array([0.0, 0.2]))
    assert not prop.violated_by(np.array([11.0, 0.0]))  # Y_0 <= 10 fails


@pytest.mark.parametrize("text,match", [
    (HEADER + BOX + "(assert (<= Y_0 Y_1)", "line 8: '\\(' never closed"),
    (HEADER + BOX + "(assert (<= Y_0 Y_7))\n", "line 8: undeclared variable"),
    (HEADER + BOX + "(assert (<= X_0 Y_1))\n", "line 8: a constraint mixing inputs and outputs"),
    (HEADER + "(assert (>= X_0 0.0))\n(assert (<= X_0 1.0))\n(assert (<= Y_0 Y_1))\n", "X_1 needs a lower and an upper"),
    (HEADER + BOX + "(assert (or (<= X_0 0.2) (>= X_0 0.8)))\n(assert (<= Y_0 Y_1))\n", "one box only"),
    (HEADER + BOX + "(assert (<= (* Y_0 Y_1) 1))\n", "product of two variables"),
    (HEADER + BOX + "(check-sat)\n", "unsupported command 'check-sat'"),
    (HEADER + BOX, "no output constraint"),
    (HEADER + BOX + "(assert (= Y_0 Y_1))\n", "unsupported formula"),
    (HEADER + "(assert (>= X_0 0.6))\n(assert (<= X_0 0.4))\n(assert (<= X_1 1))\n(assert (>= X_1 0))\n"
     "(assert (<= Y_0 Y_1))\n", "input box is empty at X_0"),
])
def test_malformed_or_unsupported_properties_raise_one_line_naming_the_problem(tmp_path, text, match):
    with pytest.raises(VnnlibError, match=match) as error:
        parse_vnnlib(_write(tmp_path, text))
    assert "\n" not in str(error.value)


def test_declared_sizes_must_match_the_network(tmp_path):
    with pytest.raises(VnnlibError, match="declares 2 inputs; the network has 3"):
        parse_vnnlib(_write(tmp_path, HEADER + BOX + "(assert (<= Y_0 Y_1))\n"), num_inputs=3)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vnn")
    return {name: (load_onnx(export(net, shape, folder / f"{name}.onnx")), folder)
            for name, (net, shape) in NETWORKS.items()}


def _point(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


@pytest.mark.parametrize("name", list(NETWORKS))
def test_unsat_at_a_tiny_box_and_no_sampled_point_contradicts_it(name, loaded):
    model, folder = loaded[name]
    x = _point(model.input_shape)
    label = int(model.model(x).argmax())
    path = robustness_property(folder / f"{name}-tiny.vnnlib", x - 1e-4, x + 1e-4, label, 3)
    prop = parse_vnnlib(path, num_inputs=x.numel(), num_outputs=3)
    result = check_property(model.model, prop, model.input_shape, timeout=60, confirm=model.run_runtime)
    assert result.verdict == "unsat", result.stages
    samples = torch.rand((500,) + model.input_shape[1:], generator=torch.Generator().manual_seed(5)) * 2e-4 - 1e-4 + x
    session = onnxruntime.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {model.input_name: samples.numpy()})[0]
    assert not any(prop.violated_by(y) for y in outputs)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_sat_with_a_counterexample_in_the_box_that_onnxruntime_confirms(name, loaded):
    model, folder = loaded[name]
    x = _point(model.input_shape, seed=1)
    label = int(model.model(x).argmin())  # x itself violates the robustness of a class it does not predict
    path = robustness_property(folder / f"{name}-sat.vnnlib", x - 0.01, x + 0.01, label, 3)
    prop = parse_vnnlib(path)
    result = check_property(model.model, prop, model.input_shape, timeout=60, confirm=model.run_runtime)
    assert result.verdict == "sat"
    cx, cy = result.counterexample
    assert np.all(cx >= prop.lower - 1e-6) and np.all(cx <= prop.upper + 1e-6)
    session = onnxruntime.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {model.input_name: cx.astype(np.float32).reshape(model.input_shape)})[0]
    assert prop.violated_by(outputs) and np.allclose(outputs.reshape(-1), cy, atol=1e-5)
    lines = result.result_text().splitlines()
    assert lines[0] == "sat" and len(lines) == 1 + cx.size + cy.size
    assert lines[1].startswith("((X_0 ") and lines[-1].endswith("))")


def test_milp_minimum_is_attained_and_below_every_sampled_value(loaded):
    model, _ = loaded["mlp"]
    x = _point(model.input_shape, seed=2)
    lower, upper = (x - 0.2).clamp(0, 1)[0], (x + 0.2).clamp(0, 1)[0]
    c = np.array([1.0, -1.0, 0.5])
    solved = exact_minimum(model.model, lower, upper, c)
    assert solved.optimal
    at_minimiser = model.run_runtime(solved.x) @ c
    assert abs(at_minimiser - solved.margin) < 1e-4
    samples = lower + (upper - lower) * torch.rand((2000,) + tuple(lower.shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        values = model.model(samples).double().numpy() @ c
    assert values.min() >= solved.margin - 1e-5


def test_milp_alone_decides_a_small_network(loaded):
    model, folder = loaded["mlp"]
    x = _point(model.input_shape, seed=3)
    label = int(model.model(x).argmax())
    prop = parse_vnnlib(robustness_property(folder / "milp.vnnlib", x - 1e-3, x + 1e-3, label, 3))
    result = check_property(model.model, prop, model.input_shape, methods=("milp",))
    assert (result.verdict, result.decided_by) == ("unsat", "milp")


def test_a_timeout_is_reported_as_timeout(loaded):
    model, folder = loaded["cnn"]
    x = _point(model.input_shape, seed=4)
    label = int(model.model(x).argmax())
    prop = parse_vnnlib(robustness_property(folder / "timeout.vnnlib", x - 0.3, x + 0.3, label, 3))
    result = check_property(model.model, prop, model.input_shape, timeout=1e-9)
    assert result.verdict == "timeout" and result.result_text() == "timeout\n"


def test_the_guard_refuses_a_false_unsat(tmp_path, monkeypatch):
    """A network violating the property only for X_0 >= 0.705: the first attack (from the centre, where
    the gradient is zero) misses it; a bound engine that wrongly proves unsat is caught by the guard."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.fill_(100.0), model[0].bias.fill_(-70.0)
        model[2].weight.copy_(torch.tensor([[0.0], [1.0]])), model[2].bias.copy_(torch.tensor([0.0, -0.5]))
    prop = parse_vnnlib(_write(tmp_path, "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
                                         "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= Y_1 Y_0))\n"))
    honest = check_property(model, prop, (1, 1), restarts=1, steps=1, methods=("ibp", "crown"), guard=True)
    assert honest.verdict in ("unknown", "sat")
    monkeypatch.setattr(vnn_module, "certified_slack",
                        lambda model, lower, upper, C, b, method: torch.full(C.shape[1:2], 1e9, dtype=torch.float64))
    with pytest.raises(SoundnessError, match="bound-engine bug"):
        check_property(model, prop, (1, 1), restarts=1, steps=1, methods=("ibp",))
