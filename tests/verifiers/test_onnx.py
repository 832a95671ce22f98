"""ONNX networks: converted by onnx2torch, equal to onnxruntime and to the torch network they were
exported from, rewritten into sound layers, bounded soundly; bad files refused with one clear error."""
import math

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn as nn

from tests.verifiers.onnx_nets import export, networks
from tests.violation import max_violation
from verifiers import onnx_model
from verifiers.bounds import compute_bounds
from verifiers.onnx_model import OnnxModelError, load_onnx

NETWORKS = networks()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return {name: export(net, shape, folder / f"{name}.onnx") for name, (net, shape) in NETWORKS.items()}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_converted_network_equals_onnxruntime_and_the_original(name, exported):
    original, shape = NETWORKS[name]
    loaded = load_onnx(exported[name])
    assert loaded.input_shape == shape and loaded.output_shape == (1, 3)
    assert loaded.runtime_difference < 1e-5
    session = onnxruntime.InferenceSession(str(exported[name]), providers=["CPUExecutionProvider"])
    x = torch.rand((5,) + shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = loaded.model(x), original.eval()(x)
    runtime = session.run(None, {"input": x.numpy()})[0]
    assert torch.allclose(ours, theirs, atol=1e-5) and np.allclose(ours.numpy(), runtime, atol=1e-5)
    native = [m for m in loaded.model.modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    assert not native  # rewritten into verifiers.layers


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_bounds_of_the_converted_network_hold_for_the_original(name, method, exported):
    original, shape = NETWORKS[name]
    loaded = load_onnx(exported[name])
    x = torch.rand((2,) + shape[1:], generator=torch.Generator().manual_seed(2))
    lower, upper = compute_bounds(loaded.model, x, 0.05, method=method)
    tolerance = 1e-5 * (1 + max(lower.abs().max().item(), upper.abs().max().item()))
    assert max_violation(original.eval(), x, 0.05, math.inf, lower.detach(), upper.detach(), samples=48,
                         pgd_steps=20) <= tolerance


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a model")
    with pytest.raises(OnnxModelError, match="not a valid ONNX model"):
        load_onnx(bad)
    with pytest.raises(OnnxModelError, match="no such file"):
        load_onnx(tmp_path / "missing.onnx")


def test_a_network_with_two_inputs_is_refused(tmp_path):
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b
    path = tmp_path / "two.onnx"
    torch.onnx.export(Two(), (torch.rand(1, 3), torch.rand(1, 3)), str(path), opset_version=13, dynamo=False)
    with pytest.raises(OnnxModelError, match="one input"):
        load_onnx(path)


def test_a_conversion_that_differs_from_onnxruntime_is_refused(exported, monkeypatch):
    real = onnx_model._convert

    def off_by_a_little(proto, path):
        model, opset = real(proto, path)
        with torch.no_grad():
            next(p for p in model.parameters() if p.dim() == 1).add_(1e-2)  # a bias: a different network
        return model, opset
    monkeypatch.setattr(onnx_model, "_convert", off_by_a_little)
    with pytest.raises(OnnxModelError, match="differs from onnxruntime"):
        load_onnx(exported["mlp"])
