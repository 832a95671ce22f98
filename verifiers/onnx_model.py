"""Networks from ONNX files: converted to torch, checked against onnxruntime, rewritten soundly.

Converter: onnx2torch (maintained, on PyPI; builds a ``torch.fx.GraphModule`` of native torch layers,
so ``verifiers.rewrite`` can replace the layers auto_LiRPA bounds wrongly, and auto_LiRPA traces the
result like any model). onnx2pytorch, the other registry option, has had no release since 2021 and
builds an opaque module that runs the ONNX graph node by node. Loading an ONNX file parses a protobuf
and never runs code from the file.
"""
from __future__ import annotations

import importlib
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from verifiers.errors import VerifierError
from verifiers.rewrite import make_sound

# onnx2torch converts these opsets of every operation it knows; a newer file is converted down first
_FALLBACK_OPSETS = (17, 13)


class OnnxModelError(VerifierError):
    """An ONNX file that cannot be read, converted, or reproduced by the converted network."""


@dataclass
class OnnxModel:
    """model: the converted network in sound form (eval mode); input_shape: the input with batch
    size 1; runtime_difference: the largest |torch - onnxruntime| seen on the check inputs."""
    path: Path
    model: nn.Module
    input_name: str
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    opset: int
    runtime_difference: float

    def run_runtime(self, x: np.ndarray) -> np.ndarray:
        """onnxruntime's outputs (flattened) on one input given flattened: the second opinion on a counterexample."""
        session = getattr(self, "_session", None) or _runtime(self.path)
        self._session = session
        feed = {self.input_name: np.asarray(x, dtype=np.float32).reshape(self.input_shape)}
        return np.asarray(session.run(None, feed)[0], dtype=np.float64).reshape(-1)


def _dims(value_info) -> List[Optional[int]]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _read(path: Path):
    try:
        import onnx
    except ImportError:  # pragma: no cover - a dependency of the package
        raise OnnxModelError("reading ONNX files needs the packages onnx, onnxruntime and onnx2torch "
                             "(pip install onnx onnxruntime onnx2torch)") from None
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as error:  # protobuf / checker errors have many types
        raise OnnxModelError(f"{path}: not a valid ONNX model ({str(error).splitlines()[0][:200]})") from None
    return model


class _DeferredTorchvision(types.ModuleType):
    """Stands in for ``torchvision`` / ``torchvision.ops`` while onnx2torch is imported: its NMS and RoIAlign
    converters import them at module level, which loads torch._dynamo (2.4 s of a 12 s VNN-COMP instance on this
    machine). An attribute is a function that imports the real one when called (only those two operations)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "ops":
            return _DeferredTorchvision("torchvision.ops")
        module = self.__name__

        def deferred(*args, **kwargs):
            return getattr(importlib.import_module(module), name)(*args, **kwargs)
        return deferred


def _onnx2torch():
    """The onnx2torch module, imported without importing torchvision (see _DeferredTorchvision)."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    names = ("torchvision", "torchvision.ops")
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        if saved[name] is None:
            sys.modules[name] = _DeferredTorchvision(name)
    try:
        return importlib.import_module("onnx2torch")
    finally:
        for name in names:
            if saved[name] is None:
                sys.modules.pop(name, None)


def _constants_to_initializers(proto) -> None:
    """Turn ``Constant`` nodes holding a tensor into initializers (in place): onnx2torch reads layer weights
    only from initializers, and torch's exporter writes non-persistent buffers (a fixed kernel) as Constants."""
    from onnx import numpy_helper
    kept = []
    for node in proto.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and len(node.output) == 1:
            tensor = numpy_helper.from_array(numpy_helper.to_array(value.t), name=node.output[0])
            proto.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def _convert(proto, path: Path) -> Tuple[nn.Module, int]:
    convert = _onnx2torch().convert
    _constants_to_initializers(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    attempts = [(opset, proto)]
    for target in _FALLBACK_OPSETS:
        if target < opset:
            attempts.append((target, None))
    last = ""
    for version, candidate in attempts:
        try:
            if candidate is None:
                from onnx import version_converter
                candidate = version_converter.convert_version(proto, version)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return convert(candidate).eval(), version
        except Exception as error:
            last = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    raise OnnxModelError(f"{path}: cannot convert to torch (onnx2torch: {last})")


def _runtime(path: Path):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_onnx(path, *, lower: Optional[torch.Tensor] = None, upper: Optional[torch.Tensor] = None,
              samples: int = 8, tolerance: float = 1e-4, seed: int = 0) -> OnnxModel:
    """Read, convert and check an ONNX classifier / regressor with one input whose first axis is the batch.

    The converted network must equal onnxruntime (``|difference| <= tolerance * max(1, |output|)``) on
    ``samples`` inputs drawn uniformly from the box ``[lower, upper]`` (default ``[0, 1]``) and on its
    centre; otherwise OnnxModelError. The returned network is rewritten into sound layers."""
    path = Path(path)
    proto = _read(path)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise OnnxModelError(f"{path}: expected one input and one output, found {len(inputs)} and "
                             f"{len(proto.graph.output)}")
    dims = _dims(inputs[0])
    if len(dims) < 2 or dims[0] not in (None, 1) or any(d is None for d in dims[1:]):
        raise OnnxModelError(f"{path}: input {inputs[0].name!r} has shape {dims}; expected a batch axis first "
                             f"(1 or symbolic) and fixed sizes after it")
    shape = (1,) + tuple(int(d) for d in dims[1:])
    model, opset = _convert(proto, path)
    generator = torch.Generator().manual_seed(seed)
    low = torch.zeros(shape) if lower is None else lower.reshape(shape).float()
    high = torch.ones(shape) if upper is None else upper.reshape(shape).float()
    points = [(low + high) / 2] + [low + (high - low) * torch.rand(shape, generator=generator) for _ in range(samples)]
    session = _runtime(path)
    worst = 0.0
    output_shape: Tuple[int, ...] = ()
    for point in points:
        expected = session.run(None, {inputs[0].name: point.numpy().astype(np.float32)})[0]
        try:
            with torch.no_grad():
                got = model(point).numpy()
        except Exception as error:
            raise OnnxModelError(f"{path}: the converted network fails on an input of shape {shape} "
                                 f"({str(error).splitlines()[0][:200]})") from None
        if got.shape != expected.shape:
            raise OnnxModelError(f"{path}: the converted network's output shape {got.shape} differs from "
                                 f"onnxruntime's {expected.shape}")
        output_shape = tuple(got.shape)
        scale = max(1.0, float(np.abs(expected).max()))
        worst = max(worst, float(np.abs(got - expected).max()) / scale)
    if worst > tolerance:
        raise OnnxModelError(f"{path}: the converted network differs from onnxruntime by {worst:.3g} "
                             f"(relative; tolerance {tolerance:g}); refusing to verify a different network")
    sound = make_sound(model, points[0])
    sound.eval()
    for parameter in sound.parameters():
        parameter.requires_grad_(False)
    return OnnxModel(path, sound, inputs[0].name, shape, output_shape, opset, worst)
