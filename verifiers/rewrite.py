"""Rewrite a user's network into layers every bound method handles soundly (``verifiers.layers``).

``make_sound(model, example)`` returns a copy of ``model`` that shares its parameters and buffers, with

- ``nn.AvgPool2d`` / ``nn.MaxPool2d`` replaced by ``layers.AvgPool2d`` / ``layers.MaxPool2d`` (same
  values; the native layers get unsound or no bounds from auto_LiRPA 0.3);
- ``nn.AdaptiveAvgPool2d`` / ``nn.AdaptiveMaxPool2d`` whose output size divides the input size (seen on
  ``example``) replaced by the equivalent fixed-window pooling;
- torchvision's ``transforms.Normalize`` used as a layer replaced by ``layers.ChannelAffine``;
- in a ``torch.fx.GraphModule`` (what onnx2torch builds from an ONNX file, or ``torch.fx.symbolic_trace``),
  an addition, subtraction, product or division of the input-dependent value by a constant replaced by
  ``layers.ChannelAffine`` (per-channel constants on images: a depthwise 1x1 convolution, which is also
  what makes an L2 ball at the input sound) or ``ConstantAffine`` (a constant product and sum).

The copy is checked against the original in float64 on ``example`` and random inputs around it; a
difference above 1e-6 (relative to the output scale) raises ``UnsupportedModelError``.
"""
from __future__ import annotations

import copy
import operator
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn

from verifiers import layers
from verifiers.errors import UnsupportedModelError

TOLERANCE = 1e-6

_NATIVE_POOLING = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_BINARY_FUNCTIONS = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
                     operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div"}


def _is_torchvision_normalize(module: nn.Module) -> bool:
    return type(module).__name__ == "Normalize" and type(module).__module__.startswith("torchvision.") \
        and hasattr(module, "mean") and hasattr(module, "std")


def needs_rewrite(model: nn.Module) -> bool:
    """Whether ``make_sound`` would change ``model``."""
    if isinstance(model, torch.fx.GraphModule):
        return True
    return any(isinstance(m, _NATIVE_POOLING) or _is_torchvision_normalize(m) for m in model.modules())


def _input_sizes(model: nn.Module, example: torch.Tensor) -> Dict[str, Tuple[int, ...]]:
    """Input shape of every adaptive pooling and normalisation layer on ``example``."""
    sizes: Dict[str, Tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or _is_torchvision_normalize(module):
            handles.append(module.register_forward_hook(
                lambda m, inputs, output, name=name: sizes.__setitem__(name, tuple(inputs[0].shape))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _sound_layer(name: str, module: nn.Module, input_shape: Optional[Tuple[int, ...]]) -> Optional[nn.Module]:
    """The sound replacement of one native layer, None when it needs none."""
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        if module.ceil_mode:
            raise UnsupportedModelError(f"cannot rewrite layer {name!r} ({type(module).__name__} with ceil_mode=True); "
                                        f"use ceil_mode=False")
        if isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                raise UnsupportedModelError(f"cannot rewrite layer {name!r}: MaxPool2d with return_indices=True")
            return layers.MaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation)
        return layers.AvgPool2d(module.kernel_size, module.stride, module.padding, module.count_include_pad,
                                module.divisor_override)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        if input_shape is None:
            return None  # not reached by the example: nothing to bound
        height, width = input_shape[-2:]
        out = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
        out = (out[0] or height, out[1] or width)
        if height % out[0] or width % out[1]:
            raise UnsupportedModelError(
                f"cannot rewrite layer {name!r} ({type(module).__name__}): output size {out} does not divide the "
                f"input size {(height, width)}, so its windows overlap unevenly")
        window = (height // out[0], width // out[1])
        if isinstance(module, nn.AdaptiveMaxPool2d):
            if module.return_indices:
                raise UnsupportedModelError(f"cannot rewrite layer {name!r}: AdaptiveMaxPool2d with return_indices")
            return layers.MaxPool2d(window, window)
        return layers.AvgPool2d(window, window)
    if _is_torchvision_normalize(module):
        if input_shape is None:
            return None
        if len(input_shape) != 4:
            raise UnsupportedModelError(f"cannot rewrite layer {name!r} (Normalize): it expects images (B, C, H, W), "
                                        f"got inputs of shape {input_shape}")
        mean = torch.as_tensor(module.mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(module.std, dtype=torch.float32).flatten()
        return layers.ChannelAffine(1.0 / std, -mean / std, input_shape[1])
    return None


def _replace_modules(model: nn.Module, example: torch.Tensor) -> None:
    sizes = _input_sizes(model, example)
    for name, module in list(model.named_modules()):
        if not name:
            continue
        replacement = _sound_layer(name, module, sizes.get(name))
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def _binary_kind(model: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[str]:
    if node.op == "call_function":
        return _BINARY_FUNCTIONS.get(node.target)
    if node.op == "call_module":
        function = getattr(model.get_submodule(node.target), "math_op_function", None)  # onnx2torch's Add/Sub/Mul/Div
        if function is None:
            return None
        if getattr(model.get_submodule(node.target), "broadcast", None) == 1:
            return None  # old-style ONNX broadcast along an axis: left as it is
        name = getattr(function, "__name__", "")
        return {"add": "add", "sub": "sub", "mul": "mul", "_onnx_div": "div", "div": "div"}.get(name)
    return None


def _constant_value(model: torch.fx.GraphModule, arg) -> Optional[torch.Tensor]:
    if isinstance(arg, (int, float)):
        return torch.tensor(float(arg))
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        value = model
        for part in arg.target.split("."):
            value = getattr(value, part)
        return value.detach() if isinstance(value, torch.Tensor) else None
    return None


def _per_channel(constant: torch.Tensor, shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """The constant as a (C,) vector when it broadcasts against ``shape`` along the channel axis only."""
    if constant.numel() == 1:
        return constant.reshape(1)
    if len(shape) < 2 or constant.dim() > len(shape):
        return None
    padded = (1,) * (len(shape) - constant.dim()) + tuple(constant.shape)
    if padded[1] == shape[1] and all(size == 1 for axis, size in enumerate(padded) if axis != 1):
        return constant.reshape(-1)
    return None


def _affine_for(kind: str, constant: torch.Tensor, input_first: bool, shape: Tuple[int, ...]) -> Optional[nn.Module]:
    """The module computing ``x (op) c`` (``input_first``) or ``c (op) x`` as x * scale + shift."""
    c = constant.to(torch.float32)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    if kind == "add":
        scale, shift = one, c
    elif kind == "sub":
        scale, shift = (one, -c) if input_first else (-one, c)
    elif kind == "mul":
        scale, shift = c, zero
    elif kind == "div" and input_first:
        if bool((c == 0).any()):
            return None
        scale, shift = 1.0 / c, zero
    else:
        return None  # c / x is not affine
    per_scale, per_shift = _per_channel(scale, shape), _per_channel(shift, shape)
    if per_scale is not None and per_shift is not None and len(shape) == 4:
        return layers.ChannelAffine(per_scale, per_shift, shape[1])
    return ConstantAffine(scale, shift)


class ConstantAffine(nn.Module):
    """``x * scale + shift`` with constant tensors broadcast against x (a constant product and sum)."""

    is_affine = True

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.clone())
        self.register_buffer("shift", shift.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def _rewrite_graph(model: torch.fx.GraphModule, example: torch.Tensor) -> None:
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(model).propagate(example)
    count = 0
    for node in list(model.graph.nodes):
        kind = _binary_kind(model, node)
        if kind is None or len(node.args) != 2 or node.kwargs:
            continue
        first, second = node.args
        c_first, c_second = _constant_value(model, first), _constant_value(model, second)
        if (c_first is None) == (c_second is None):
            continue
        x_node, constant = (first, c_second) if c_second is not None else (second, c_first)
        meta = x_node.meta.get("tensor_meta") if isinstance(x_node, torch.fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            continue
        module = _affine_for(kind, constant, c_second is not None, tuple(meta.shape))
        if module is None:
            continue
        name = f"sound_affine_{count}"
        count += 1
        model.add_submodule(name, module)
        with model.graph.inserting_before(node):
            replacement = model.graph.call_module(name, (x_node,))
        replacement.meta = dict(node.meta)  # its shape, for a constant operation that follows
        node.replace_all_uses_with(replacement)
        model.graph.erase_node(node)
    if count:
        model.graph.eliminate_dead_code()
        model.recompile()


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module structure that shares the parameter and buffer tensors of ``model``."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def make_sound(model: nn.Module, example: torch.Tensor, *, check: bool = True) -> nn.Module:
    """A copy of ``model`` (sharing its parameters) with native layers replaced by sound equivalents;
    ``example``: an input batch of the model's shape. UnsupportedModelError when a layer cannot be
    rewritten or the copy's outputs differ from the original's."""
    sound = shared_copy(model)
    was_training = model.training
    sound.eval()
    _replace_modules(sound, example)
    if isinstance(sound, torch.fx.GraphModule):
        _rewrite_graph(sound, example)
    sound.train(was_training)
    if check:
        check_equal(model, sound, example)
    return sound


def check_equal(model: nn.Module, sound: nn.Module, example: torch.Tensor, samples: int = 4) -> float:
    """Largest difference of the two models' outputs (float64, eval mode) on ``example`` and on random
    points around it, relative to the output scale; UnsupportedModelError above ``TOLERANCE``."""
    generator = torch.Generator().manual_seed(0)
    inputs = [example] + [example + 0.1 * torch.randn(example.shape, generator=generator).to(example)
                          for _ in range(samples)]
    # full copies: .double() on a copy that shares tensors would convert the caller's parameters in place
    reference, rewritten = copy.deepcopy(model).double().eval(), copy.deepcopy(sound).double().eval()
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            expected, got = reference(x.double()), rewritten(x.double())
            if expected.shape != got.shape:
                raise UnsupportedModelError(f"the sound rewrite changed the output shape from {tuple(expected.shape)} "
                                            f"to {tuple(got.shape)}")
            scale = max(1.0, float(expected.abs().max()))
            worst = max(worst, float((expected - got).abs().max()) / scale)
    if worst > TOLERANCE:
        raise UnsupportedModelError(f"the sound rewrite of {type(model).__name__} changed its outputs by {worst:.3g} "
                                    f"(relative; tolerance {TOLERANCE:g}); please report this model")
    return worst


# model -> {(input shape, device, dtype): (sound copy, ids of the model's parameters and buffers)}
_VIEWS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def sound_view(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``make_sound(model, example)``, cached per model and input shape (made again when a parameter or
    buffer tensor is replaced), in the model's current train / eval mode; ``model`` itself when nothing
    needs rewriting."""
    if not needs_rewrite(model):
        return model
    key = (tuple(example.shape[1:]), example.device, example.dtype)
    ids = tuple(id(t) for t in list(model.parameters()) + list(model.buffers()))
    per_model = _VIEWS.setdefault(model, {})
    hit = per_model.get(key)
    if hit is None or hit[1] != ids:
        was_training = model.training
        model.eval()
        try:
            hit = (make_sound(model, example[:1].detach()), ids)
        finally:
            model.train(was_training)
        per_model[key] = hit
    return hit[0].train(model.training)

