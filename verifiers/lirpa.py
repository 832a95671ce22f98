"""The only module that imports auto_LiRPA.

auto-LiRPA 0.3 (the only release on the package registry) was written for torch < 1.13 and
numpy 1. Importing this module applies the small compatibility patches it needs on torch 2.x and
numpy 2, then re-exports the pieces the rest of ``verifiers`` uses. Each patch says what moved and
which test covers it (``tests/verifiers/test_lirpa.py`` unless stated otherwise).

Patches are idempotent and only fill in what is missing, so on an environment where the old names
still exist nothing is replaced.
"""
from __future__ import annotations

import importlib
import math
import sys
import types
from typing import Tuple

import numpy
import torch
import torch.nn.functional as F
import torch.onnx

from verifiers.errors import EnvironmentVersionError

# The auto-LiRPA releases the patches below were written against and tested with.
TESTED_VERSIONS = ("0.3",)


def check_version(version: str) -> None:
    """EnvironmentVersionError, in one line, unless ``version`` is one the patches were tested with: they
    replace internals of auto_LiRPA, and on another release they could silently bound the wrong thing."""
    if version not in TESTED_VERSIONS:
        raise EnvironmentVersionError(
            f"verifiers.lirpa patches auto-LiRPA {' / '.join(TESTED_VERSIONS)}, and this environment has {version}: "
            f"install the tested release with `pip install --no-deps auto-LiRPA=={TESTED_VERSIONS[-1]}` "
            f"(scripts/setup.sh does)")


def _installed_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("auto-LiRPA")
    except metadata.PackageNotFoundError:
        raise EnvironmentVersionError("auto-LiRPA is not installed: `pip install --no-deps auto-LiRPA==0.3` "
                                      "(scripts/setup.sh does)") from None


check_version(_installed_version())


def _patch_numpy_arraysetops() -> None:
    # 1. numpy 2 removed ``numpy.lib.arraysetops``; auto_LiRPA.operators.base imports ``isin``
    #    from it. ``numpy.isin`` is the same function. Covered by test_auto_lirpa_imports.
    try:
        importlib.import_module("numpy.lib.arraysetops")
    except ImportError:
        shim = types.ModuleType("numpy.lib.arraysetops")
        shim.isin = numpy.isin
        sys.modules["numpy.lib.arraysetops"] = shim


def _patch_onnx_helpers() -> None:
    # 2. ``torch.onnx.utils._optimize_graph`` moved to
    #    ``torch.onnx._internal.torchscript_exporter.utils`` (parse_graph imports it by the old name).
    # 3. ``torch.onnx.symbolic_helper._set_opset_version`` is gone; the opset now lives in
    #    ``GLOBALS.export_onnx_opset_version``. Both are used when a model is traced, so
    #    test_plain_cnn_bounds_trace_and_run covers them.
    import torch.onnx.symbolic_helper as symbolic_helper
    import torch.onnx.utils as onnx_utils

    try:
        from torch.onnx._internal.torchscript_exporter import utils as ts_utils
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # older torch: the old names are still there
        ts_utils, GLOBALS = None, None

    if not hasattr(onnx_utils, "_optimize_graph") and ts_utils is not None:
        onnx_utils._optimize_graph = ts_utils._optimize_graph
    if not hasattr(symbolic_helper, "_set_opset_version") and GLOBALS is not None:
        def _set_opset_version(opset_version: int) -> None:
            GLOBALS.export_onnx_opset_version = opset_version

        symbolic_helper._set_opset_version = _set_opset_version


def _patch_node_getitem() -> None:
    # 4. ``torch._C.Node`` is no longer subscriptable; parse_graph reads attributes as
    #    ``node[name]``. The typed getters remain: ``node.kindOf(name)`` names the getter
    #    (``i``, ``f``, ``s``, ``t``, ``is_``, ...). Covered by test_plain_cnn_bounds_trace_and_run
    #    (every conv has attributes).
    if not hasattr(torch._C.Node, "__getitem__"):
        def _getitem(node: torch._C.Node, name: str):
            return getattr(node, node.kindOf(name))(name)

        torch._C.Node.__getitem__ = _getitem


def _patch_named_members(bounded_module_cls: type) -> None:
    # 5. ``nn.Module.named_parameters()`` now calls
    #    ``_named_members(..., remove_duplicate=...)``; BoundedModule's override in 0.3 does not take
    #    that keyword. Accept and honour it. Covered by test_bounded_module_named_parameters.
    original = bounded_module_cls._named_members
    if getattr(original, "_certnas_patched", False):
        return

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        if remove_duplicate:
            yield from original(self, get_members_fn, prefix, recurse)
            return
        modules = self.named_modules(prefix=prefix) if recurse else [(prefix, self)]
        for module_prefix, module in modules:
            for name, value in get_members_fn(module):
                if value is None:
                    continue
                yield (module_prefix + ("." if module_prefix else "") + name, value)

    _named_members._certnas_patched = True
    bounded_module_cls._named_members = _named_members


def _unfold_like_patches(factor: torch.Tensor, A, spatial: tuple) -> torch.Tensor:
    """A per-position factor ``(1 or B, 1 or C, H, W)`` laid out like the patches of ``A``.

    Patch entry ``[.., oh, ow, c, kh, kw]`` is the coefficient of input pixel
    ``(c, oh * stride - top + kh, ow * stride - left + kw)``; the factor is padded with zeros (the
    padded pixels do not exist) and unfolded with the same window, stride and padding.
    """
    import torch.nn.functional as F
    from auto_LiRPA.patches import unify_shape

    inserted = getattr(A, "inserted_zeros", 0)
    out_pad = getattr(A, "output_padding", 0)
    if inserted or (out_pad if isinstance(out_pad, int) else any(out_pad)):
        raise NotImplementedError("certnas: per-position constant on patches with inserted zeros")
    pieces = A.patches
    in_c, kh, kw = pieces.shape[-3:]
    if factor.dim() != 4:
        factor = factor.reshape((1,) * (4 - factor.dim()) + tuple(factor.shape))
    factor = factor.expand(factor.shape[0], in_c, *spatial)
    left, right, top, bottom = unify_shape(A.padding)
    step_h, step_w = _stride_hw(A.stride)
    padded = F.pad(factor, (left, right, top, bottom))
    out_h = (padded.shape[2] - kh) // step_h + 1
    out_w = (padded.shape[3] - kw) // step_w + 1
    unfolded = F.unfold(padded, (kh, kw), stride=(step_h, step_w))  # (N, in_c * kh * kw, out_h * out_w)
    unfolded = unfolded.view(factor.shape[0], in_c, kh, kw, out_h, out_w).permute(0, 4, 5, 1, 2, 3)
    if A.unstable_idx is None:
        if pieces.dim() != 7 or tuple(pieces.shape[2:4]) != (out_h, out_w):
            raise NotImplementedError(f"certnas: unexpected patches shape {tuple(pieces.shape)}")
        return unfolded.unsqueeze(0)  # (1, N, out_h, out_w, in_c, kh, kw)
    _, rows, cols = A.unstable_idx
    return unfolded[:, rows, cols].transpose(0, 1)  # (U, N, in_c, kh, kw)


def _patch_mul_by_unperturbed(bound_mul_cls: type, patches_cls: type) -> None:
    # 6. BoundMul in 0.3 treats a factor as constant only if it is a graph constant, a buffer or a
    #    raw parameter. A factor *computed* from parameters (softmax of architecture weights in a
    #    mixed operation) goes down the "both inputs perturbed" path, whose shape handling fails.
    #    When one factor does not depend on the perturbed input, the product is linear in the
    #    other, so multiplying the linear coefficients by that factor's value is exact, and the
    #    value keeps its autograd graph (architecture gradients flow through it). Scalar factors
    #    are also allowed on patches-mode coefficients. Covered by the mixed-operation tests in
    #    tests/verifiers/test_soundness.py and tests/verifiers/test_gradients.py.
    original = bound_mul_cls.bound_backward
    if getattr(original, "_certnas_patched", False):
        return

    def scale(A, factor, spatial):
        if A is None:
            return None
        if isinstance(A, patches_cls):
            if factor.numel() == 1:
                return A.create_similar(A.patches * factor.reshape(()))
            return A.create_similar(A.patches * _unfold_like_patches(factor, A, spatial))
        return A * factor

    def bound_backward(self, last_lA, last_uA, x, y):
        if x.perturbed and y.perturbed:
            return original(self, last_lA, last_uA, x, y)
        if not x.perturbed and not y.perturbed:
            return [(None, None), (None, None)], 0.0, 0.0
        variable, constant = (x, y) if x.perturbed else (y, x)
        # The current value: ``lower`` (== ``upper``) is recomputed for unperturbed inputs on every
        # call; ``.value`` is cached from the first trace and goes stale when parameters change.
        factor = getattr(constant, "lower", None)
        if factor is None:
            factor = getattr(constant, "forward_value", None)
        if factor is None:
            raise RuntimeError(f"certnas: no current value for multiplier {constant.name}")
        spatial = tuple(variable.output_shape[-2:])
        lA = scale(last_lA, factor, spatial)
        uA = scale(last_uA, factor, spatial)
        if isinstance(lA, torch.Tensor):
            lA = self.broadcast_backward(lA, variable)
        if isinstance(uA, torch.Tensor):
            uA = self.broadcast_backward(uA, variable)
        coefficients = (lA, uA)
        return ([coefficients, (None, None)] if x.perturbed else [(None, None), coefficients]), 0.0, 0.0

    bound_backward._certnas_patched = True
    bound_mul_cls.bound_backward = bound_backward

    # The same in interval propagation: the general product of two intervals costs about a dozen
    # full-size tensor operations (four products, NaN guards, min and max) for what is a
    # multiplication by a known factor. Exactness of this path: the soundness tests on mixed ops.
    original_interval = bound_mul_cls.interval_propagate

    def interval_propagate(self, *v):
        perturbed = [inp.perturbed for inp in self.inputs]
        if self.is_constant_op or all(perturbed) or not any(perturbed):
            return original_interval(self, *v)
        (lower, upper), factor = (v[0], v[1][0]) if perturbed[0] else (v[1], v[0][0])
        positive, negative = factor.clamp(min=0), factor.clamp(max=0)
        return lower * positive + upper * negative, upper * positive + lower * negative

    bound_mul_cls.interval_propagate = interval_propagate


def _patch_constant_bounds(bound_constant_cls: type) -> None:
    # 7. Full CROWN reads ``weight = inputs[1].lower`` in BoundConv.bound_backward. Root nodes
    #    (inputs, parameters, buffers) get ``lower = upper = value`` when bounds start, but a
    #    BoundConstant (a tensor built in forward, e.g. the fixed kernel of GlobalAvgPool) never
    #    does, so CROWN fails with "BoundConstant has no attribute lower". A constant's bounds are
    #    its value. Covered by the crown / alpha-crown cases of tests/verifiers/test_soundness.py.
    if isinstance(getattr(bound_constant_cls, "lower", None), property):
        return

    def value(self):
        return self.value

    def ignore(self, *args):
        return None

    bound_constant_cls.lower = property(value, ignore, ignore)
    bound_constant_cls.upper = property(value, ignore, ignore)
    # 9. BoundBatchNormalization.bound_backward reads ``inputs[1].param`` (the scale); with
    #    ``affine=False`` (DARTS search cells) the scale and shift are traced as constants, which
    #    have no ``param``. Their value is the parameter. Covered by
    #    test_supernet_bounds_are_sound_for_every_method in tests/certnas/test_supernet.py.
    bound_constant_cls.param = property(value, ignore, ignore)


def _patch_params_keep_requires_grad(bound_params_cls: type) -> None:
    # 8. BoundParams.forward in 0.3 calls ``param.requires_grad_(self.training)``. The parameter
    #    is the user's own nn.Parameter, so bounding an eval-mode model switched gradients off on
    #    the model itself, and eval-mode IBP bounds came back without a graph. Whether to track
    #    gradients is the caller's choice (torch.no_grad); leave the flag alone. Covered by
    #    tests/verifiers/test_gradients.py and test_bounding_leaves_requires_grad_alone.
    if getattr(bound_params_cls.forward, "_certnas_patched", False):
        return

    def forward(self):
        return self.param_init if self.initializing else self.param

    forward._certnas_patched = True
    bound_params_cls.forward = forward


def _patch_self_reload(bounded_module_cls: type) -> None:
    # 10. BoundedModule.__init__ reloads its own state dict after the tracing forward pass. The
    #     parameters are the user's own tensors, so this copies each one onto itself, which bumps
    #     its autograd version counter: any graph the caller built before the first bound call
    #     (e.g. ``loss = CE(net(x), y)`` followed by a metric) then fails in backward with
    #     "modified by an inplace operation". Skip entries that already hold the target's values.
    #     Covered by test_first_bound_call_keeps_earlier_graphs_usable.
    original = bounded_module_cls.load_state_dict
    if getattr(original, "_certnas_patched", False):
        return

    def load_state_dict(self, state_dict, strict=False):
        own = {}
        for node in self._modules.values():
            tensor = getattr(node, "param", None) if hasattr(node, "param") else None
            if isinstance(tensor, torch.Tensor):
                own[getattr(node, "ori_name", None)] = tensor
        def same_storage(key, value):
            mine = own.get(key)
            if mine is None or not isinstance(value, torch.Tensor) or mine.shape != value.shape:
                return False
            # __init__ reloads a deep copy: equal values, other storage. Writing them is a no-op.
            return mine.data_ptr() == value.data_ptr() or torch.equal(mine.detach(), value.to(mine.device))

        filtered = type(state_dict)((k, v) for k, v in state_dict.items() if not same_storage(k, v))
        return original(self, filtered, strict=strict)

    load_state_dict._certnas_patched = True
    bounded_module_cls.load_state_dict = load_state_dict


def dense_kernel(weight: torch.Tensor, groups: int, dilation) -> torch.Tensor:
    """The kernel of the dense, undilated convolution equal to a grouped and/or dilated one:
    ``(out, in / groups, k, k)`` -> ``(out, in, d (k - 1) + 1, ...)``, block-diagonal over the groups,
    with zeros between the taps. Same padding and stride give the same outputs (and gradients reach
    ``weight``)."""
    out_channels, per_group, kh, kw = weight.shape
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    dense = weight.new_zeros(out_channels, per_group * groups, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out_per_group = out_channels // groups
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        dense[rows, group * per_group:(group + 1) * per_group, ::dh, ::dw] = weight[rows]
    return dense


class _FixedValue:
    """Stands in for a graph node whose value is known (what BoundConv.bound_backward reads)."""

    def __init__(self, value: torch.Tensor, perturbed: bool = False):
        self.lower = self.upper = self.value = value
        self.perturbed = perturbed


def _patch_grouped_dilated_conv_patches(bound_conv_cls: type, patches_cls: type) -> None:
    # 12. In "patches" mode BoundConv.bound_backward ignores ``groups`` and ``dilation``: the patches
    #     branch calls conv_transpose2d(patches, weight, stride=...) without either, and the
    #     identity-patches branch reshapes a (out, in / groups, k, k) weight as if it held every input
    #     channel. Full CROWN's bounds on a depthwise 3x3 convolution were violated by sampled and
    #     PGD points by 1.8e-2 (16x16 inputs), dilated ones failed with shape errors; depthwise and
    #     dilated convolutions are in every sep_conv / dil_conv and in the pooling rewrites. This is
    #     the same in the newest upstream release (0.7.1). Fix: when the
    #     coefficients are patches, run the backward of the equal dense, undilated convolution
    #     (``dense_kernel``); matrix-mode coefficients keep the original path, which was correct.
    #     Covered by tests/verifiers/test_patches.py (patches == matrix on every operation, sampled /
    #     PGD / MILP soundness of full CROWN in patches mode).
    original = bound_conv_cls.bound_backward
    if getattr(original, "_certnas_patched", False):
        return

    def bound_backward(self, last_lA, last_uA, *x):
        uses_patches = isinstance(last_lA, patches_cls) or isinstance(last_uA, patches_cls)
        dilation = (self.dilation, self.dilation) if isinstance(self.dilation, int) else tuple(self.dilation)
        if not uses_patches or (self.groups == 1 and dilation == (1, 1)):
            return original(self, last_lA, last_uA, *x)
        dense = dense_kernel(x[1].lower, self.groups, dilation)
        saved = self.groups, self.dilation
        self.groups, self.dilation = 1, (1, 1)
        try:
            return original(self, last_lA, last_uA, x[0], _FixedValue(dense, x[1].perturbed), *x[2:])
        finally:
            self.groups, self.dilation = saved

    bound_backward._certnas_patched = True
    bound_backward.__wrapped_original__ = original  # tests show the original is wrong in patches mode
    bound_conv_cls.bound_backward = bound_backward


def _stride_hw(stride) -> Tuple[int, int]:
    """auto_LiRPA's patch strides are an int, (h, w), or its 4-tuple form (w, w, h, h)."""
    if isinstance(stride, int):
        return stride, stride
    stride = tuple(int(s) for s in stride)
    return (stride[0], stride[1]) if len(stride) == 2 else (stride[2], stride[0])


def patches_to_matrix(pieces, input_shape, stride, padding, output_shape=None, unstable_idx=None):
    """Dense coefficients ``(batch, rows, c, h, w)`` of patches: what auto_LiRPA's function of the same
    name computes, with the row step of a padded ``(h_pad, w_pad)`` image being ``w_pad * stride_h``.

    pieces: ``(out_c, batch, out_h, out_w, c, kh, kw)`` (rows = out_c * out_h * out_w), or with
    ``unstable_idx = (channels, rows, cols)`` ``(unstable, batch, c, kh, kw)``; padding (left, right,
    top, bottom) or an int."""
    from auto_LiRPA.patches import unify_shape
    left, right, top, bottom = unify_shape(padding)
    step_h, step_w = _stride_hw(stride)
    if pieces.ndim == 9:  # two extra singleton dimensions, as auto_LiRPA writes them
        pieces = pieces.reshape(pieces.shape[0], *pieces.shape[2:5], *pieces.shape[6:])
    channels, kernel_h, kernel_w = pieces.shape[-3:]
    height, width = int(input_shape[-2]), int(input_shape[-1])
    padded_h, padded_w = height + top + bottom, width + left + right
    if unstable_idx is None:
        out_c, batch, out_h, out_w = pieces.shape[:4]
        matrix = pieces.new_zeros(batch, out_c, out_h, out_w, channels, padded_h * padded_w)
        st = matrix.stride()
        windows = torch.as_strided(matrix, [batch, out_c, out_h, out_w, out_h, out_w, channels, kernel_h, kernel_w],
                                   [st[0], st[1], st[2], st[3], padded_w * step_h, step_w, st[4], padded_w, 1])
        index = torch.arange(out_h * out_w, device=pieces.device)
        rows, cols = index // out_w, index % out_w
        windows[:, :, rows, cols, rows, cols] = pieces.transpose(0, 1).reshape(batch, out_c, out_h * out_w,
                                                                             channels, kernel_h, kernel_w)
        matrix = matrix.view(batch, out_c * out_h * out_w, channels, padded_h, padded_w)
    else:
        unstable, batch = pieces.shape[:2]
        out_h, out_w = int(output_shape[-2]), int(output_shape[-1])
        matrix = pieces.new_zeros(batch, unstable, channels, padded_h * padded_w)
        st = matrix.stride()
        windows = torch.as_strided(matrix, [batch, unstable, out_h, out_w, channels, kernel_h, kernel_w],
                                   [st[0], st[1], padded_w * step_h, step_w, st[2], padded_w, 1])
        windows[:, torch.arange(unstable, device=pieces.device), unstable_idx[1], unstable_idx[2]] = \
            pieces.transpose(0, 1).to(matrix)
        matrix = matrix.view(batch, unstable, channels, padded_h, padded_w)
    return matrix[:, :, :, top:top + height, left:left + width]


def _patch_patches_to_matrix() -> None:
    # 13. auto_LiRPA.patches.patches_to_matrix steps from one output row to the next by the padded
    #     *height* times the stride (``(input_x + pad_top + pad_bottom) * stride``) where a row-major
    #     padded image needs the padded *width*. With padding that differs between the axes (the 1x3
    #     and 3x1 passes of max_pool_3x3) the coefficients land on the wrong pixels: L2 CROWN bounds
    #     differed from matrix mode by 2e-2 and the height pass failed with an out-of-bounds view. The
    #     same function turns patches into a matrix once they outgrow the input, in L-inf too. It also
    #     required an int stride. Replaced where auto_LiRPA imported it by name. Covered by
    #     test_patches_to_matrix_matches_a_direct_construction and the L2 cases of
    #     test_patches_mode_crown_equals_matrix_mode_on_every_operation (tests/verifiers/test_patches.py).
    import auto_LiRPA.operators.convolution as convolution
    import auto_LiRPA.operators.shape as shape
    import auto_LiRPA.patches as patches
    import auto_LiRPA.perturbations as perturbations
    for module in (patches, perturbations, shape, convolution):
        module.patches_to_matrix = patches_to_matrix


def _patch_patch_strides() -> None:
    # 14. compute_patches_stride_padding returns a stride that differs between the axes as a 4-tuple
    #     (w, w, h, h), which inplace_unfold (L-inf concretisation, biases, per-position factors)
    #     rejects with an assertion: full CROWN failed on max_pool_3x3 at stride 2, whose passes have
    #     strides (1, 2) and (2, 1). A stride has one value per axis, so return it as (h, w), the form
    #     every consumer accepts. Covered by the stride-2 cases of
    #     test_patches_mode_crown_equals_matrix_mode_on_every_operation.
    import auto_LiRPA.operators.convolution as convolution
    import auto_LiRPA.operators.pooling as pooling
    import auto_LiRPA.patches as patches
    original = patches.compute_patches_stride_padding
    if getattr(original, "_certnas_patched", False):
        return

    def compute_patches_stride_padding(*args, **kwargs):
        padding, stride, output_padding = original(*args, **kwargs)
        if not isinstance(stride, int) and len(stride) == 4:
            stride = _stride_hw(stride)
        return padding, stride, output_padding

    compute_patches_stride_padding._certnas_patched = True
    for module in (patches, convolution, pooling):
        module.compute_patches_stride_padding = compute_patches_stride_padding


def _patch_patches_add(patches_cls: type) -> None:
    # 15. Patches.__add__ (coefficients of two branches meeting at one node) aligned the two windows by
    #     their paddings alone. When the paddings are equal but the kernels are not (a 1x1 and a 2x2
    #     stride-2 branch both give 4x4 outputs from 8x8: the output size rounds down), ``A1 + A2``
    #     broadcast the 1x1 coefficients over the whole 2x2 window. Full CROWN's intermediate bounds
    #     after skip_connect at stride 2 (DARTS' factorized reduce) were violated by corner points of
    #     the input box by 0.47. Fix: place each window in input coordinates (window k covers rows
    #     i * stride - top_k ... i * stride - top_k + kh_k - 1), pad both to the union of the two, and
    #     keep the largest bottom / right padding, which leaves the output size unchanged (every
    #     window's size rounds to the same output). Covered by the skip_connect stride-2 cases of
    #     test_patches_mode_crown_equals_matrix_mode_on_every_operation and by
    #     test_adding_patches_of_different_kernels_aligns_them_in_input_coordinates.
    original = patches_cls.__add__
    if getattr(original, "_certnas_patched", False):
        return
    from auto_LiRPA.patches import unify_shape

    def __add__(self, other):
        if not isinstance(other, patches_cls):
            return original(self, other)
        assert self.stride == other.stride and self.inserted_zeros == other.inserted_zeros
        if self.unstable_idx is not None or other.unstable_idx is not None:
            if self.unstable_idx is not other.unstable_idx:
                raise ValueError('Please set bound option "sparse_conv_intermediate_bounds" to False to run this model.')
        pads = [unify_shape(p.padding) for p in (self, other)]  # (left, right, top, bottom)
        sizes = [tuple(p.patches.shape[-2:]) for p in (self, other)]  # (h, w)
        top = max(pad[2] for pad in pads)
        left = max(pad[0] for pad in pads)
        height = top + max(size[0] - pad[2] for size, pad in zip(sizes, pads))
        width = left + max(size[1] - pad[0] for size, pad in zip(sizes, pads))
        total, bottom, right = None, 0, 0
        for piece, size, pad in zip((self.patches, other.patches), sizes, pads):
            extra = (left - pad[0], width - size[1] - (left - pad[0]), top - pad[2], height - size[0] - (top - pad[2]))
            bottom = max(bottom, pad[3] + extra[3])
            right = max(right, pad[1] + extra[1])
            piece = F.pad(piece, extra) if any(extra) else piece
            total = piece if total is None else total + piece
        return patches_cls(total, other.stride, (left, right, top, bottom), total.shape, unstable_idx=self.unstable_idx,
                           output_shape=self.output_shape, inserted_zeros=self.inserted_zeros,
                           output_padding=self.output_padding)

    __add__._certnas_patched = True
    patches_cls.__add__ = __add__


def _patch_bias_layout_after_matrix_switch() -> None:
    # 16. Back-substitution in patches mode keeps the accumulated bias in the patches layout
    #     (batch, C, H, W) and reshapes it to the matrix layout (batch, C * H * W) only when a later node
    #     returns a tensor bias (check_patch_biases). A bias-free convolution that switches the
    #     coefficients to a dense matrix (once patches outgrow the input) left the bias in the patches
    #     layout, and concretize failed ("size of tensor a (4) must match ... (64)") on sep_conv_3x3 at
    #     stride 2. When the coefficients reaching the input are a matrix, flatten the bias the way
    #     patches_to_matrix orders its rows (channel, then row, then column). Covered by the stride-2
    #     cases of test_patches_mode_crown_equals_matrix_mode_on_every_operation.
    import auto_LiRPA.backward_bound as backward_bound
    original = backward_bound.concretize
    if getattr(original, "_certnas_patched", False):
        return

    def flat(bias):
        return bias.reshape(bias.shape[0], -1) if isinstance(bias, torch.Tensor) and bias.ndim > 2 else bias

    def concretize(lb, ub, node, root, batch_size, output_dim, *args, **kwargs):
        if any(type(A) is torch.Tensor for r in root for A in (r.lA, r.uA)):
            lb, ub = flat(lb), flat(ub)
        return original(lb, ub, node, root, batch_size, output_dim, *args, **kwargs)

    concretize._certnas_patched = True
    backward_bound.concretize = concretize


def _patch_concat_starts_in_patches(bounded_module_cls: type, patches_cls: type) -> None:
    # 19. CROWN's intermediate bound of a node starts from an identity specification over its
    #     neurons. auto_LiRPA 0.3 builds that identity as patches (a 1x1 window per neuron) only for
    #     convolutions, batch norms, Add and Sub; every other node gets a dense (neurons x neurons)
    #     matrix. A DARTS cell's output is a channel concatenation feeding the next cells' ReLU, so
    #     on a 3-cell network at 28x28 the identity over its 25,088 neurons alone needed more than
    #     23 GB in a bound computed with gradients (the process was killed). A channel concatenation
    #     of 4-D maps passes patches back (BoundConcat.bound_backward splits their input-channel
    #     axis), so its identity is built as patches too, sparse over the neurons IBP leaves unstable
    #     exactly as for Add. The bounds are the same linear functions in another layout. Covered by
    #     test_a_concatenation_feeding_a_relu_starts_its_crown_bound_in_patches (against matrix mode)
    #     and test_crown_in_patches_mode_equals_matrix_mode_and_holds_on_a_cell_network
    #     (tests/verifiers/test_cells.py).
    from auto_LiRPA.operators.shape import BoundConcat
    original = bounded_module_cls.get_sparse_C
    if getattr(original, "_certnas_patched", False):
        return

    def get_sparse_C(self, node, sparse_intermediate_bounds=True, ref_intermediate_lb=None, ref_intermediate_ub=None):
        shape = node.output_shape
        if not (isinstance(node, BoundConcat) and self.conv_mode == "patches" and len(shape) == 4
                and node.axis in (1, -3)):
            return original(self, node, sparse_intermediate_bounds, ref_intermediate_lb, ref_intermediate_ub)
        batch, channels = self.batch_size, shape[1]
        eye = torch.eye(channels, device=self.device, dtype=next(iter(self.parameters())).dtype)
        if sparse_intermediate_bounds:
            unstable_idx, unstable_size = self.get_unstable_locations(ref_intermediate_lb, ref_intermediate_ub, conv=True)
            if unstable_size == 0:
                return None, True, [], 0
            dense_share = self.bound_opts.get("minimum_sparsity", 0.9)
            if self.bound_opts.get("sparse_conv_intermediate_bounds", False) and unstable_size <= dense_share * math.prod(shape[1:]):
                # one 1x1 window per unstable neuron (channel c, row h, column w): (unstable, batch, C, 1, 1)
                patches = eye[unstable_idx[0]].view(unstable_size, 1, channels, 1, 1).expand(-1, batch, -1, -1, -1)
                return (patches_cls(patches, 1, 0, patches.shape, unstable_idx=unstable_idx,
                                    output_shape=[batch, *shape[1:]]), True, unstable_idx, unstable_size)
        # one 1x1 window per neuron: (C, batch, H, W, C, 1, 1)
        patches = eye.view(channels, 1, 1, 1, channels, 1, 1).expand(-1, batch, shape[2], shape[3], -1, 1, 1)
        return patches_cls(patches, 1, 0, patches.shape, output_shape=[batch, *shape[1:]]), False, None, float("inf")

    get_sparse_C._certnas_patched = True
    bounded_module_cls.get_sparse_C = get_sparse_C


def _patch_chunked_intermediate_rows(bounded_module_cls: type, patches_cls: type) -> None:
    # 20. An intermediate CROWN bound back-substitutes one row per neuron of its node at once, and in
    #     patches mode each row's window grows to the whole input on the way back: on a 3-cell network
    #     at 28x28 (25,088 neurons in a cell's output) one node's rows passed 17 GB with gradients
    #     enabled and a later node ran out of memory. With the bound option ``certnas_max_rows`` = R,
    #     a patches-mode identity start with more than R rows is back-substituted R rows at a time
    #     (the rows are independent: each is the bound of one neuron) and the pieces are put back in
    #     order. The output specification is never split. Covered by test_chunked_crown_rows_give_the_same_bounds
    #     (tests/verifiers/test_cells.py).
    original = bounded_module_cls.backward_general
    if getattr(original, "_certnas_patched", False):
        return

    def rows_of(C, device):
        """(c, h, w) index tensors of an identity start's rows, or None when C is not one."""
        if C.unstable_idx is not None:
            return C.unstable_idx
        if len(C.shape) != 7 or tuple(C.shape[-2:]) != (1, 1) or C.shape[0] != C.shape[4]:
            return None
        channels, height, width = C.shape[0], C.shape[2], C.shape[3]
        grid = torch.meshgrid(torch.arange(channels), torch.arange(height), torch.arange(width), indexing="ij")
        return tuple(index.flatten().to(device) for index in grid)

    def piece(C, index, rows):
        batch = C.shape[1]
        shape = [len(rows[0]), batch, C.output_shape[1], 1, 1]
        if C.identity == 1 or C.patches is None:
            return patches_cls(shape=shape, identity=1, unstable_idx=rows, output_shape=C.output_shape)
        if C.unstable_idx is not None:
            patches = C.patches[index]
        else:  # (C, batch, H, W, C, 1, 1) -> one (batch, C, 1, 1) window per selected neuron
            patches = C.patches[rows[0], :, rows[1], rows[2]]
        return patches_cls(patches, 1, 0, patches.shape, unstable_idx=rows, output_shape=C.output_shape)

    def backward_general(self, C, node=None, bound_lower=True, bound_upper=True, average_A=False,
                         need_A_only=False, unstable_idx=None, unstable_size=0, update_mask=None, verbose=True):
        limit = self.bound_opts.get("certnas_max_rows", 0)
        call = dict(bound_lower=bound_lower, bound_upper=bound_upper, average_A=average_A, need_A_only=need_A_only,
                    update_mask=update_mask, verbose=verbose)
        rows = None
        if (limit and isinstance(C, patches_cls) and node is not None and node.name != self.final_name
                and not (self.return_A or need_A_only or average_A)):
            rows = rows_of(C, self.device)
        if rows is None or len(rows[0]) <= limit:
            return original(self, C, node, unstable_idx=unstable_idx, unstable_size=unstable_size, **call)
        lowers, uppers = [], []
        for start in range(0, len(rows[0]), limit):
            index = torch.arange(start, min(start + limit, len(rows[0])), device=rows[0].device)
            part = tuple(r[index] for r in rows)
            lower, upper = original(self, piece(C, index, part), node, unstable_idx=part, unstable_size=len(index), **call)
            lowers.append(lower)
            uppers.append(upper)
        join = lambda parts: None if parts[0] is None else torch.cat(parts, dim=1)
        lower, upper = join(lowers), join(uppers)
        if C.unstable_idx is None:  # the full identity: back to the node's shape
            shape = (lower if lower is not None else upper).shape[0], *node.output_shape[1:]
            lower = None if lower is None else lower.reshape(shape)
            upper = None if upper is None else upper.reshape(shape)
        return lower, upper

    backward_general._certnas_patched = True
    bounded_module_cls.backward_general = backward_general


def _patch_output_only_alpha(bounded_module_cls: type) -> None:
    # 17. alpha-CROWN in 0.3 makes a dense alpha per ReLU for every later node whose bounds it
    #     back-substitutes (shape 2 x that node's neurons x batch x the ReLU's neurons) and re-optimises
    #     every intermediate bound in each iteration: on the default DARTS network one digit needed
    #     more than 24 GB. With the bound option ``certnas_output_alpha_only`` the alphas are made for
    #     the output specification alone; verifiers.bounds then passes the intermediate bounds of a
    #     CROWN pass as fixed (auto_LiRPA's later releases fix them by default too). Any alpha in
    #     [0, 1] gives a sound relaxation, and the first iteration reproduces CROWN, whose bound the
    #     optimiser keeps if nothing beats it. Covered by test_alpha_crown_is_sound_and_never_looser_than_crown
    #     and the alpha-crown cases of the soundness / MILP / patches tests.
    original = bounded_module_cls.get_alpha_crown_start_nodes
    if getattr(original, "_certnas_patched", False):
        return

    def get_alpha_crown_start_nodes(self, node, c=None, share_slopes=False, final_node_name=None):
        if not self.bound_opts.get("certnas_output_alpha_only", False):
            return original(self, node, c=c, share_slopes=share_slopes, final_node_name=final_node_name)
        final = final_node_name or self.final_name
        if not any(start.name == final for start in self.backward_from[node.name]):
            return []
        size = self[final].output_shape[-1] if c is None else c.size(1)
        return [(final, size, None)]  # (start node, specification size, unstable index: all)

    get_alpha_crown_start_nodes._certnas_patched = True
    bounded_module_cls.get_alpha_crown_start_nodes = get_alpha_crown_start_nodes


def _patch_alpha_clamp_gradient(bound_relu_cls: type) -> None:
    # 18. alpha-CROWN clamps each ReLU's lower slope alpha to [0, 1] before using it. The torch versions
    #     auto_LiRPA 0.3 was written for let the gradient of clamp through at the ends of the range;
    #     torch 2.x gives it zero there, and CROWN initialises every alpha at exactly 0 or 1, so every
    #     gradient was zero and "alpha-CROWN" returned CROWN's bound unchanged (seen: 0.0 improvement
    #     on every test network). The slopes are clipped to [0, 1] after each optimiser step anyway,
    #     so the clamp's gradient is taken as the identity (value clamped, gradient passed).
    #     Covered by test_alpha_crown_is_sound_and_never_looser_than_crown (must tighten some margin).
    original = bound_relu_cls._relu_mask_alpha
    if getattr(original, "_certnas_patched", False):
        return

    def clamp_passing_gradient(alpha):
        return None if alpha is None else alpha + (alpha.clamp(0.0, 1.0) - alpha).detach()

    def _relu_mask_alpha(lower, upper, lb_lower_d, ub_lower_d):
        # as 0.3's: stable-active neurons get slope 1, stable-inactive 0, unstable the clamped alpha
        lower_mask = (lower >= 0).to(lower.dtype)
        upper_mask = upper <= 0
        unstable = (1.0 - lower_mask) * (1.0 - upper_mask.to(upper.dtype))
        lb_lower_d, ub_lower_d = (None if d is None else clamp_passing_gradient(d) * unstable + lower_mask
                                  for d in (lb_lower_d, ub_lower_d))
        return lb_lower_d, ub_lower_d, upper_mask.all()

    _relu_mask_alpha._certnas_patched = True
    bound_relu_cls._relu_mask_alpha = staticmethod(_relu_mask_alpha)


import logging  # noqa: E402
import warnings  # noqa: E402

# auto_LiRPA imports torch.utils.cpp_extension for an optional CUDA kernel, which logs a warning on
# machines without a CUDA toolkit; the torch.onnx internals warn that torch.jit.script is
# deprecated. Both are noise for users of certnas.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    # 11. auto_LiRPA.utils and bound_general call ``warnings.simplefilter("once")`` at import,
    #     which would override this guard and change the warning filters of the whole process.
    #     The call is disabled while importing (catch_warnings restores the filters after).
    #     Covered by test_import_changes_no_warning_filters.
    _simplefilter = warnings.simplefilter
    warnings.simplefilter = lambda *args, **kwargs: None
    _patch_numpy_arraysetops()
    _patch_onnx_helpers()
    _patch_node_getitem()
    import auto_LiRPA  # noqa: E402  (must follow the patches above)
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm  # noqa: E402
    warnings.simplefilter = _simplefilter

from auto_LiRPA.operators.activation import BoundRelu  # noqa: E402
from auto_LiRPA.operators.bivariate import BoundMul  # noqa: E402
from auto_LiRPA.operators.convolution import BoundConv  # noqa: E402
from auto_LiRPA.operators.constant import BoundConstant  # noqa: E402
from auto_LiRPA.operators.leaf import BoundParams  # noqa: E402
from auto_LiRPA.patches import Patches  # noqa: E402

_patch_named_members(BoundedModule)
_patch_self_reload(BoundedModule)
_patch_mul_by_unperturbed(BoundMul, Patches)
_patch_constant_bounds(BoundConstant)
_patch_params_keep_requires_grad(BoundParams)
_patch_grouped_dilated_conv_patches(BoundConv, Patches)
_patch_patches_to_matrix()
_patch_patch_strides()
_patch_patches_add(Patches)
_patch_bias_layout_after_matrix_switch()
_patch_output_only_alpha(BoundedModule)
_patch_concat_starts_in_patches(BoundedModule, Patches)
_patch_chunked_intermediate_rows(BoundedModule, Patches)
_patch_alpha_clamp_gradient(BoundRelu)

AUTO_LIRPA_VERSION: str = getattr(auto_LiRPA, "__version__", "unknown")

__all__ = ["BoundedModule", "BoundedTensor", "PerturbationLpNorm", "AUTO_LIRPA_VERSION", "auto_LiRPA"]
