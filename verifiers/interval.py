"""IBP and CROWN-IBP in plain PyTorch: the fast bound path of certified training.

auto_LiRPA builds a graph of bound operators and spends most of a training step in per-node
bookkeeping (README, Benchmarks). Here the model runs *eagerly* on an :class:`Interval`: a tensor
whose value is the clean forward pass and which carries, for every value the input ball can
produce, a box ``[center - radius, center + radius]``. One forward call therefore gives the clean
logits (batch-norm statistics and the cross entropy come from them), the IBP box of every
intermediate value, and a tape of the linear and ReLU operations that a CROWN-IBP backward pass
walks from the margin specification back to the input.

Supported on the input path (anything else raises :class:`UnsupportedModelError`, naming it):
``conv2d`` (any stride, padding, dilation, groups), ``linear``, ``batch_norm`` (training mode: the
clean batch's statistics; eval mode: the running ones), ``relu``, sums and differences of two
boxes, products and sums with values that do not depend on the input, ``cat`` along a non-batch
dimension, and shape-only operations that keep the batch dimension (``flatten``, ``view``,
``reshape``). Only the L-inf ball (intersected with [0, 1]) is supported: use
``verifiers.bounds`` (auto_LiRPA) for L2.

Soundness is shown by ``tests/verifiers/test_interval.py``, which does not trust this code: the
bounds equal auto_LiRPA's IBP / CROWN-IBP bounds on every operation of the search space, the mixed
operation and DARTS networks (never tighter where auto_LiRPA's graph optimiser merges duplicated
parameter-free operations), random and PGD-searched points never leave them, and the exact MILP
minimum on small networks is never below them.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from verifiers.errors import BoundInputError, UnsupportedModelError
from verifiers.rewrite import sound_view

__all__ = ["Interval", "MarginBounds", "interval_margins", "interval_logit_bounds", "clean_value", "normalise_channels"]

_ids = itertools.count()


class Node:
    """One recorded operation: ``kind``, the nodes it reads (``parents``) and what its backward
    rule needs (``data``). ``shape`` is the output shape without the batch dimension."""
    __slots__ = ("kind", "parents", "data", "shape", "order")

    def __init__(self, kind: str, parents: Tuple["Node", ...], data: Dict[str, Any], shape: Tuple[int, ...]):
        self.kind, self.parents, self.data, self.shape = kind, parents, data, shape
        self.order = next(_ids)


def ancestors(node: Node) -> set:
    """Every node ``node`` is computed from (itself excluded)."""
    seen, stack = set(), list(node.parents)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.parents)
    return seen


class Interval(torch.Tensor):
    """A tensor holding the clean value, with ``center`` / ``radius`` (the IBP box, same shape) and
    ``node`` (the operation that produced it). Made by :func:`Interval.from_ball`; every supported
    torch operation on it returns another Interval."""
    value: torch.Tensor
    center: torch.Tensor
    radius: torch.Tensor
    node: Node

    @staticmethod
    def make(value: torch.Tensor, center: torch.Tensor, radius: torch.Tensor, node: Node) -> "Interval":
        out = value.as_subclass(Interval)
        out.value, out.center, out.radius, out.node = value, center, radius, node
        return out

    @staticmethod
    def from_ball(x: torch.Tensor, eps: Union[float, torch.Tensor], clean: bool = True) -> "Interval":
        """The L-inf ball of radius eps (float or (B,)) around x, intersected with [0, 1]."""
        eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
        lower = (x - eps_t).clamp(0.0, 1.0)
        upper = (x + eps_t).clamp(0.0, 1.0)
        return Interval.from_box(x, lower, upper, clean)

    @staticmethod
    def from_box(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, clean: bool = True) -> "Interval":
        """The box ``lower <= x' <= upper`` (each shaped like x) with clean value x. ``clean=False``: boxes
        only; the value is the box centre itself (the same tensor), no operation computes a clean value
        (a third of the work when nothing reads it) and training-mode batch norm is refused."""
        node = Node("input", (), {"lower": lower, "upper": upper}, tuple(x.shape[1:]))
        center = (upper + lower) / 2
        return Interval.make(x if clean else center, center, (upper - lower) / 2, node)

    @property
    def clean(self) -> bool:
        """Whether this Interval carries the clean value (False: its value is its box centre)."""
        return self.value is not self.center

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if _is_metadata(func):
            return func(*_plain(args), **kwargs)
        name = getattr(func, "__name__", repr(func))
        raise UnsupportedModelError(f"interval bounds: operation {name!r} on the input path is not supported "
                                    f"(supported: conv2d, linear, batch_norm, relu, +, -, * by an input-independent "
                                    f"value, cat, flatten/view/reshape); use verifiers.bounds for this model")

    def __repr__(self) -> str:  # the default repr goes through unsupported operations
        return f"Interval(shape={tuple(self.value.shape)})"


def _plain(args):
    return tuple(a.value if isinstance(a, Interval) else a for a in args)


_METADATA_PROPERTIES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse",
                        "is_quantized", "is_meta", "names"}
_METADATA_METHODS = {"size", "dim", "numel", "is_floating_point", "is_complex", "element_size", "get_device",
                     "is_contiguous", "__len__", "nelement", "has_names"}


def _is_metadata(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return getattr(owner, "__name__", "") in _METADATA_PROPERTIES
    return name in _METADATA_METHODS


def _rebatch(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(shape[1:])


# ---------------------------------------------------------------- forward rules (clean value + box + tape)

# Small convolutions (batch x output channels at most FUSE_LIMIT) compute the clean value, the box centre
# and the box radius in one grouped convolution instead of three: there each call's fixed cost outweighs its
# arithmetic (the search supernet: 4 channels, batch 32, and R on 8 samples), and one call forward and one
# backward made the default CLB search step 17-20% faster. Larger ones stay at three calls: fused, oneDNN's
# grouped kernels ran them up to 4x slower (README, Benchmarks). 0: never fuse. Both forms compute
# the same bounds (tests/verifiers/test_interval.py compares them).
FUSE_LIMIT = 128


def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if not isinstance(input, Interval) or isinstance(weight, Interval) or isinstance(bias, Interval):
        raise UnsupportedModelError("interval bounds: a convolution whose weights depend on the input")
    if _is_channel_scale(weight, stride, padding, dilation, groups):
        # a depthwise 1x1 convolution (certnas' input normalisation) is a per-channel affine map: recorded as
        # one, every engine bounds it elementwise. As a convolution over full CROWN's (B x pixels) forward-mode
        # rows, oneDNN took 19 s per call for what is 20 million multiplications (1 channel, 28x28, 32 digits).
        view = (1, -1, 1, 1)
        return _affine(input, lambda v: F.conv2d(v, weight, bias, stride, padding, dilation, groups),
                       weight.reshape(view), None if bias is None else bias.reshape(view))
    clean = input.clean
    if input.value.dim() == 4 and input.value.shape[0] * weight.shape[0] <= FUSE_LIMIT:
        # channels [value | centre | radius] through 3 * groups groups with weights [W | W | |W|]: each
        # group sees only its own block's channels, so each block of the output is the convolution it
        # stands for; the results are channel slices (views) of one output (no value block without clean)
        blocks = [input.value] * clean + [input.center, input.radius]
        weights = torch.cat([weight] * (1 + clean) + [weight.abs()], 0)
        biases = None if bias is None else torch.cat([bias] * (1 + clean) + [torch.zeros_like(bias)])
        parts = F.conv2d(torch.cat(blocks, 1), weights, biases, stride, padding, dilation,
                         len(blocks) * groups).chunk(len(blocks), 1)
        center, radius = parts[-2:]
        value = parts[0] if clean else center
    else:
        center = F.conv2d(input.center, weight, bias, stride, padding, dilation, groups)
        radius = F.conv2d(input.radius, weight.abs(), None, stride, padding, dilation, groups)
        value = F.conv2d(input.value, weight, bias, stride, padding, dilation, groups) if clean else center
    node = Node("conv", (input.node,), {"weight": weight, "bias": bias, "stride": stride, "padding": padding,
                                        "dilation": dilation, "groups": groups}, _rebatch(value.shape))
    return Interval.make(value, center, radius, node)


def _is_channel_scale(weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether a convolution multiplies each channel by one number (depthwise, 1x1, stride 1, no padding)."""
    return (weight.dim() == 4 and tuple(weight.shape[1:]) == (1, 1, 1) and groups == weight.shape[0]
            and _pair(stride) == (1, 1) and _pair(dilation) == (1, 1)
            and (padding in ("valid", "same") or _pair(padding) == (0, 0)))


def _linear(input, weight, bias=None):
    if not isinstance(input, Interval) or isinstance(weight, Interval) or isinstance(bias, Interval):
        raise UnsupportedModelError("interval bounds: a linear layer whose weights depend on the input")
    center = F.linear(input.center, weight, bias)
    radius = F.linear(input.radius, weight.abs())
    value = F.linear(input.value, weight, bias) if input.clean else center
    node = Node("linear", (input.node,), {"weight": weight, "bias": bias}, _rebatch(value.shape))
    out = Interval.make(value, center, radius, node)
    out.linear_input = input  # the margin specification is folded into a final linear layer
    return out


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if not isinstance(input, Interval):
        raise UnsupportedModelError("interval bounds: batch norm whose parameters depend on the input")
    view = (1, -1) + (1,) * (input.value.dim() - 2)
    if training or running_mean is None:
        if not input.clean:
            raise UnsupportedModelError("interval bounds without the clean value: training-mode batch norm needs "
                                        "the clean batch's statistics")
        # training mode bounds the function with this batch's clean statistics (as auto_LiRPA does); the clean
        # value is normalised with the same statistics instead of a second pass of F.batch_norm
        mean, var = batch_moments(input.value)
        if training and running_mean is not None:
            update_running_statistics(running_mean, running_var, mean, var, input.value.numel() // mean.numel(),
                                      momentum)
        scale, shift = _normalising_map(mean, var, weight, bias, eps)
        offset = bias.view(view) if bias is not None else 0.0
        return _affine(input, lambda v: (v - mean.view(view)) * scale.view(view) + offset,
                       scale.view(view), shift.view(view))
    scale, shift = _normalising_map(running_mean, running_var, weight, bias, eps)
    return _affine(input, lambda v: F.batch_norm(v, running_mean, running_var, weight, bias, training, momentum, eps),
                   scale.view(view), shift.view(view))


def batch_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of ``x`` (B, C, ...), differentiable. Two passes (mean, then
    the mean square deviation): on CPU ``torch.var_mean`` over these dimensions took 10-20x longer
    (benchmarks/bench_train.py)."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    return mean.flatten(), (x - mean).square().mean(dims)


@torch.no_grad()
def update_running_statistics(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                              var: torch.Tensor, count: Union[int, torch.Tensor], momentum: float) -> None:
    """What training-mode ``F.batch_norm`` does to the running statistics: an exponential average with
    weight ``momentum`` of the batch mean and the unbiased batch variance of ``count`` values per channel
    (a number, or a one-element tensor such as a count summed over processes).
    Through ``.data``, unseen by autograd as inside F.batch_norm's kernel: a plain forward of the same module
    earlier in the graph saved these buffers (torch's batch-norm backward takes them; training mode reads
    neither), and a visible in-place update would make its backward refuse to run."""
    running_mean.data.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
    unbiased = count / (count - 1).clamp_min(1) if isinstance(count, torch.Tensor) else count / max(count - 1, 1)
    running_var.data.mul_(1 - momentum).add_(var.detach() * unbiased, alpha=momentum)


def _normalising_map(mean: torch.Tensor, var: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel of batch norm with these statistics: ``x * scale + shift``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    return scale, (-mean * scale if bias is None else bias - mean * scale)


def _affine(input: Interval, value: Callable[[torch.Tensor], torch.Tensor], scale, shift) -> Interval:
    """``input * scale + shift`` with input-independent scale and shift (tensors or numbers); ``value``
    maps the clean value (called only where the Interval carries one)."""
    center = input.center * scale if scale is not None else input.center
    radius = input.radius * abs(scale) if scale is not None else input.radius
    if shift is not None:
        center = center + shift
    value = value(input.value) if input.clean else center
    node = Node("affine", (input.node,), {"scale": scale, "shift": shift}, _rebatch(value.shape))
    return Interval.make(value, center, radius, node)


def clean_value(x: torch.Tensor) -> torch.Tensor:
    """The clean (unperturbed) value of ``x``: an Interval's forward value, a plain tensor itself."""
    return x.value if isinstance(x, Interval) else x


def normalise_channels(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Batch norm of ``x`` (B, C, ...) with given per-channel statistics (C,), whose gradient flows (batch
    norm with statistics gathered elsewhere, e.g. over several processes). For an Interval it is the
    per-channel affine map it stands for, bounded exactly like training-mode batch norm."""
    scale, shift = _normalising_map(mean, var, weight, bias, eps)
    view = (1, -1) + (1,) * (x.dim() - 2)
    scale, shift = scale.view(view), shift.view(view)
    if isinstance(x, Interval):
        return _affine(x, lambda v: v * scale + shift, scale, shift)
    return x * scale + shift


def _relu(input, inplace=False):
    if inplace:
        raise UnsupportedModelError("interval bounds: in-place relu on the input path")
    cached = getattr(input, "relu_output", None)
    if cached is not None:
        # One node for relu(x) however often x is rectified (DARTS operations on one edge each start
        # with a ReLU of the same input): one relaxation of the summed coefficients is tighter than
        # one per copy, and it matches auto_LiRPA, whose graph optimiser merges the copies.
        return cached
    lower = input.center - input.radius
    upper = input.center + input.radius
    # Active neurons pass the box on unchanged; unstable and inactive ones become [0, max(upper, 0)].
    # Not written as (relu(upper) -+ relu(lower)) / 2: that difference cancels in float32 when the
    # radius is far below the centre's rounding error.
    active = lower >= 0
    half_upper = upper.clamp_min(0) * 0.5
    center = torch.where(active, input.center, half_upper)
    radius = torch.where(active, input.radius, half_upper)
    node = Node("relu", (input.node,), {"lower": lower, "upper": upper}, input.node.shape)
    out = Interval.make(F.relu(input.value) if input.clean else center, center, radius, node)
    input.relu_output = out
    return out


def _add(a, b, *, alpha=1):
    if alpha != 1:
        raise UnsupportedModelError("interval bounds: add with alpha")
    return _sum(a, b, 1.0)


def _sub(a, b, *, alpha=1):
    if alpha != 1:
        raise UnsupportedModelError("interval bounds: sub with alpha")
    return _sum(a, b, -1.0)


def _rsub(a, b, *, alpha=1):
    if alpha != 1:
        raise UnsupportedModelError("interval bounds: rsub with alpha")
    return _sum(b, a, -1.0)


def _sum(a, b, sign: float):
    """``a + sign * b``."""
    if isinstance(a, Interval) and isinstance(b, Interval):
        if a.clean != b.clean:
            raise UnsupportedModelError("interval bounds: a sum of a clean-valued and a box-only interval")
        center = a.center + b.center if sign > 0 else a.center - b.center
        value = (a.value + b.value if sign > 0 else a.value - b.value) if a.clean else center
        node = Node("sum", (a.node, b.node), {"signs": (1.0, sign)}, _rebatch(value.shape))
        return Interval.make(value, center, a.radius + b.radius, node)
    if isinstance(a, Interval):
        return _affine(a, lambda v: v + b if sign > 0 else v - b, None, b if sign > 0 else -b)
    return _affine(b, lambda v: a + v if sign > 0 else a - v, sign if sign < 0 else None, a)


def _mul(a, b):
    if isinstance(a, Interval) and isinstance(b, Interval):
        raise UnsupportedModelError("interval bounds: a product of two input-dependent values")
    box, factor = (a, b) if isinstance(a, Interval) else (b, a)
    return _affine(box, lambda v: v * factor, factor, None)


def _div(a, b):
    if not isinstance(a, Interval) or isinstance(b, Interval):
        raise UnsupportedModelError("interval bounds: division by an input-dependent value")
    return _affine(a, lambda v: v / b, 1.0 / b, None)


def _neg(a):
    return _affine(a, torch.neg, -1.0, None)


def _cat(tensors, dim=0):
    tensors = list(tensors)
    ndim = tensors[0].dim()
    if dim % ndim == 0:
        raise UnsupportedModelError("interval bounds: concatenation along the batch dimension")
    parts = []
    for t in tensors:
        if isinstance(t, Interval):
            parts.append(t)
        else:  # an input-independent block: a box of width zero, no parent (its value is its centre either way)
            zero = torch.zeros_like(t)
            parts.append(Interval.make(t, t, zero, Node("constant", (), {"value": t}, _rebatch(t.shape))))
    clean = {t.clean for t in tensors if isinstance(t, Interval)}
    if len(clean) > 1:
        raise UnsupportedModelError("interval bounds: concatenating clean-valued and box-only intervals")
    center = torch.cat([p.center for p in parts], dim)
    radius = torch.cat([p.radius for p in parts], dim)
    value = torch.cat([p.value for p in parts], dim) if clean == {True} else center
    sizes = [p.value.shape[dim] for p in parts]
    node = Node("cat", tuple(p.node for p in parts), {"dim": dim % ndim, "sizes": sizes}, _rebatch(value.shape))
    return Interval.make(value, center, radius, node)


def _reshaping(name: str) -> Callable:
    def apply(input, *args, **kwargs):
        if not isinstance(input, Interval):
            raise UnsupportedModelError(f"interval bounds: {name} of an input-independent value by an interval")
        # a fused convolution's results are channel slices, not contiguous: view as reshape (a view where it can be)
        method = getattr(torch.Tensor, "reshape" if name == "view" else name)
        center = method(input.center, *args, **kwargs)
        if center.shape[0] != input.center.shape[0]:
            raise UnsupportedModelError(f"interval bounds: {name} that changes the batch dimension")
        radius = method(input.radius, *args, **kwargs)
        value = method(input.value, *args, **kwargs) if input.clean else center
        if name == "contiguous":
            return Interval.make(value, center, radius, input.node)
        node = Node("reshape", (input.node,), {}, _rebatch(value.shape))
        return Interval.make(value, center, radius, node)
    return apply


def _flatten(input, start_dim=0, end_dim=-1):
    return _reshaping("flatten")(input, start_dim, end_dim)


_HANDLERS: Dict[Any, Callable] = {
    F.conv2d: _conv2d, torch.conv2d: _conv2d,
    F.linear: _linear,
    F.batch_norm: _batch_norm,
    F.relu: _relu, torch.relu: _relu, torch.Tensor.relu: _relu,
    torch.add: _add, torch.Tensor.add: _add, torch.Tensor.__add__: _add, torch.Tensor.__radd__: _add,
    torch.sub: _sub, torch.Tensor.sub: _sub, torch.Tensor.__sub__: _sub, torch.Tensor.__rsub__: _rsub,
    torch.mul: _mul, torch.Tensor.mul: _mul, torch.Tensor.__mul__: _mul, torch.Tensor.__rmul__: _mul,
    torch.Tensor.__truediv__: _div, torch.div: _div, torch.Tensor.div: _div,
    torch.neg: _neg, torch.Tensor.neg: _neg, torch.Tensor.__neg__: _neg,
    torch.cat: _cat, torch.concat: _cat,
    torch.flatten: _flatten, torch.Tensor.flatten: _flatten,
    torch.Tensor.view: _reshaping("view"), torch.Tensor.reshape: _reshaping("reshape"),
    torch.reshape: _reshaping("reshape"), torch.Tensor.contiguous: _reshaping("contiguous"),
}


# ---------------------------------------------------------------- CROWN-IBP: back-substitution from the output

@dataclass
class ReluRelaxation:
    """CROWN's linear relaxation of one ReLU node, precomputed for repeated back-substitution (full CROWN
    bounds every layer through it). ``passes`` (B, *shape): 1 where the neuron is active, else 0; ``unstable``
    (U,): flat indices of the neurons unstable for some sample; ``lower_slope``, ``upper_slope``,
    ``upper_intercept`` (B, U): the relaxation there (a sample stable at such an index gets its exact slope
    and intercept 0); ``lower_slope`` may also be (B, S, U), one per row of the specification back-substituted
    (alpha-CROWN). Bounds: lower_slope * z <= relu(z) <= upper_slope * z + upper_intercept."""
    passes: torch.Tensor
    unstable: torch.Tensor
    lower_slope: torch.Tensor
    upper_slope: torch.Tensor
    upper_intercept: torch.Tensor

    @staticmethod
    def from_bounds(lower: torch.Tensor, upper: torch.Tensor,
                    lower_slope: Optional[torch.Tensor] = None) -> "ReluRelaxation":
        """The relaxation for pre-activation bounds ``lower <= z <= upper`` (B, *shape); ``lower_slope``
        (B, *shape) in [0, 1] overrides CROWN's choice (1 where ``upper > -lower``, else 0) on unstable neurons."""
        batch = lower.shape[0]
        flat_l, flat_u = lower.reshape(batch, -1), upper.reshape(batch, -1)
        unstable = ((flat_l < 0) & (flat_u > 0)).any(0).nonzero().flatten()
        l, u = flat_l[:, unstable], flat_u[:, unstable]
        open_ = (l < 0) & (u > 0)
        active = (l >= 0).to(lower.dtype)
        upper_slope = torch.where(open_, u / (u - l).clamp_min(1e-12), active)
        upper_intercept = torch.where(open_, -l * upper_slope, torch.zeros_like(l))
        if lower_slope is None:
            chosen = (u > -l).to(lower.dtype)
        else:
            chosen = lower_slope.reshape(batch, -1)[:, unstable]
        return ReluRelaxation((lower >= 0).to(lower.dtype), unstable, torch.where(open_, chosen, active),
                              upper_slope, upper_intercept)

    def dense(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lower slope, upper slope, upper intercept), each (B, *shape) (shared lower slopes only); cached."""
        cached = getattr(self, "_dense", None)
        if cached is None:
            batch, shape = self.passes.shape[0], self.passes.shape
            flat = self.passes.reshape(batch, -1)
            cached = (flat.index_copy(1, self.unstable, self.lower_slope).view(shape),
                      flat.index_copy(1, self.unstable, self.upper_slope).view(shape),
                      torch.zeros_like(flat).index_copy(1, self.unstable, self.upper_intercept).view(shape))
            self._dense = cached
        return cached


def back_substitute(output: Node, spec: torch.Tensor,
                    origin: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor, Node]:
    """``spec . output >= A . x + bias`` for every x in the input box: spec (B, S, *output.shape) ->
    ``(A (B, S, *input.shape), bias (B, S), input node)``.

    Linear operations pass the coefficients back exactly; each ReLU is replaced by a linear relaxation:
    its ``relaxation`` (a :class:`ReluRelaxation`) where one is stored on the node, else CROWN's, from the
    node's pre-activation bounds (upper: the chord; lower: slope 1 where ``u > -l``, else 0). Two hooks in
    a node's ``data``: ``extra_coefficients`` (B, S, *shape) is added to the coefficients reaching the node
    (a term of the objective there: branch and bound's split multipliers); a ReLU with a ``captured`` key gets
    the coefficients on its output stored there.

    origin: (row, column) where a spec (B, S, C, h, w) covering only a window of a (C, H, W) output starts
    (the rest of the spec is zero: e.g. the rows of neurons close to each other). The coefficients then travel
    as windows (a convolution's input window is its output window grown by the kernel, clipped to the map),
    widened to the full map only where an operation needs it; the entries left out are exactly zero, so the
    bound is the same as with the full spec, at the cost of the window's area."""
    batch, rows = spec.shape[:2]
    top, left = origin or (0, 0)
    pending: Dict[Node, Tuple[torch.Tensor, int, int]] = {output: (spec, top, left)}
    queue = [(-output.order, output)]  # latest first: every consumer of a node was made after it
    bias = torch.zeros(batch, rows, device=spec.device, dtype=spec.dtype)
    found = None
    while queue:
        node = heapq.heappop(queue)[1]
        A, top, left = pending.pop(node)
        kind, data = node.kind, node.data
        extra = data.get("extra_coefficients")
        if _is_window(A, node) and (extra is not None or not _keeps_window(node)):
            A, top, left = _widen(A, node, top, left), 0, 0
        window = (top, left)
        if extra is not None:  # a term added to the objective at this node (beta-CROWN's split multipliers)
            A = A + extra
        if kind == "input":
            found = (A, node)
            continue
        if kind == "constant":
            bias = bias + (A * data["value"].unsqueeze(1)).flatten(2).sum(2)
            continue
        if kind == "linear":
            weight, b = data["weight"], data["bias"]
            if b is not None:
                bias = bias + A @ b
            _push(pending, queue, node.parents[0], A @ weight)
        elif kind == "conv":
            parent = node.parents[0]
            if data["bias"] is not None:
                bias = bias + (A.sum((3, 4)) * data["bias"]).sum(2)
            if _is_window(A, node):
                pushed = _conv_backward_window(A, parent.shape, data, top, left)
                if pushed is not None:
                    _push(pending, queue, parent, *pushed)
            else:
                _push(pending, queue, parent, _conv_backward(A, parent.shape, data))
        elif kind == "affine":
            scale, shift = data["scale"], data["shift"]
            if shift is not None:
                shift_full = _crop(_expand_like(torch.as_tensor(shift, device=A.device, dtype=A.dtype), A), A, top, left)
                bias = bias + (A * shift_full).sum(tuple(range(2, A.dim())))
            if scale is not None:
                A = A * _crop(_expand_like(torch.as_tensor(scale, device=A.device, dtype=A.dtype), A), A, top, left)
            _push(pending, queue, node.parents[0], A, *window)
        elif kind == "relu":
            if "captured" in data:  # the coefficients on this ReLU's output (branching scores)
                data["captured"] = A.detach()
            relaxation = data.get("relaxation")
            if relaxation is not None and _is_window(A, node):
                A, extra = _dense_step(A, *(_crop(t.unsqueeze(1), A, top, left) for t in relaxation.dense()))
                bias = bias + extra
                _push(pending, queue, node.parents[0], A, *window)
                continue
            if relaxation is not None:
                A, extra = _relaxed_sparse(A, relaxation)
                bias = bias + extra
                _push(pending, queue, node.parents[0], A)
                continue
            l, u = _crop(data["lower"].unsqueeze(1), A, top, left), _crop(data["upper"].unsqueeze(1), A, top, left)
            unstable = (l < 0) & (u > 0)
            active = (l >= 0).to(A.dtype)
            upper_slope = torch.where(unstable, u / (u - l).clamp_min(1e-12), active)
            lower_slope = torch.where(unstable, (u > -l).to(A.dtype), active)
            # the chord's intercept -l * slope: 0 where the neuron is active (-l <= 0) or off (slope 0)
            A, extra = _dense_step(A, lower_slope, upper_slope, (-l).clamp_min(0) * upper_slope)
            bias = bias + extra
            _push(pending, queue, node.parents[0], A, *window)
        elif kind == "sum":
            for parent, sign in zip(node.parents, data["signs"]):
                _push(pending, queue, parent, A if sign > 0 else -A, *window)
        elif kind == "cat":
            dim = data["dim"] + 1  # (B, S, ...): the spec dimension shifts every axis by one
            for parent, piece in zip(node.parents, torch.split(A, data["sizes"], dim=dim)):
                _push(pending, queue, parent, piece, *window)
        elif kind == "reshape":
            parent = node.parents[0]
            _push(pending, queue, parent, A.reshape(batch, rows, *parent.shape))
        else:  # pragma: no cover - every kind made above is handled
            raise AssertionError(f"unknown node kind {kind}")
    if found is None:
        raise UnsupportedModelError("interval bounds: the output does not depend on the input")
    return found[0], bias, found[1]


# ---------------------------------------------------------------- coefficient windows (see back_substitute)

def _is_window(A: torch.Tensor, node: Node) -> bool:
    """Whether A (B, S, *node.shape) covers only part of a (C, H, W) node's map."""
    return len(node.shape) == 3 and tuple(A.shape[-2:]) != tuple(node.shape[-2:])


def _keeps_window(node: Node) -> bool:
    """Whether back-substituting through the node works on a window of its coefficients: convolutions, affine
    maps, ReLUs with a shared (not per-row) relaxation or none, sums and concatenations of channels."""
    if node.kind == "relu":
        relaxation = node.data.get("relaxation")
        return "captured" not in node.data and (relaxation is None or relaxation.lower_slope.dim() == 2)
    if node.kind == "cat":
        return node.data["dim"] == 1
    return node.kind in ("conv", "affine", "sum")


def _crop(factor, A: torch.Tensor, top: int, left: int):
    """A factor broadcast against full-map coefficients, cut to A's window (dims of size 1 stay)."""
    if not isinstance(factor, torch.Tensor) or factor.dim() < 2:
        return factor
    height, width = A.shape[-2:]
    if factor.shape[-2] > 1:
        factor = factor[..., top:top + height, :]
    if factor.shape[-1] > 1:
        factor = factor[..., left:left + width]
    return factor


def _widen(A: torch.Tensor, node: Node, top: int, left: int) -> torch.Tensor:
    """A window of coefficients as the full map (zeros outside)."""
    height, width = node.shape[-2:]
    return F.pad(A, (left, width - left - A.shape[-1], top, height - top - A.shape[-2]))


def _conv_backward_window(A: torch.Tensor, in_shape: Tuple[int, ...], data: Dict[str, Any], top: int,
                          left: int) -> Optional[Tuple[torch.Tensor, int, int]]:
    """``_conv_backward`` of a window of the output's coefficients: ``(A_in window, top, left)`` on the input
    map (None where the window reaches only padding)."""
    batch, rows = A.shape[:2]
    weight, kernel, stride, padding, dilation = _transposable(data)
    flat = A.reshape(batch * rows, *A.shape[2:])
    if CHANNELS_LAST_ROWS and batch * rows >= CHANNELS_LAST_ROWS and flat.device.type == "cpu":
        flat = flat.contiguous(memory_format=torch.channels_last)
    result = F.conv_transpose2d(flat, weight, None, stride, 0, 0, data["groups"], dilation)
    # the transposed convolution without padding covers the input from (top, left) * stride - padding
    starts = [origin * stride[i] - padding[i] for i, origin in enumerate((top, left))]
    first = [max(start, 0) for start in starts]
    last = [min(start + result.shape[2 + i], in_shape[1 + i]) for i, start in enumerate(starts)]
    if last[0] <= first[0] or last[1] <= first[1]:
        return None
    result = result[..., first[0] - starts[0]:last[0] - starts[0], first[1] - starts[1]:last[1] - starts[1]]
    return result.reshape(batch, rows, in_shape[0], last[0] - first[0], last[1] - first[1]), first[0], first[1]


def _relaxed_sparse(A: torch.Tensor, relaxation: ReluRelaxation) -> Tuple[torch.Tensor, torch.Tensor]:
    """A ReLU's back-substitution step with a precomputed relaxation: returns ``(A_in, bias term (B, S))``.
    With few unstable neurons: the coefficients times the exact slope (0 or 1) everywhere, then the unstable
    entries replaced (indexing A (B, S, *shape) rather than flattening it, which would copy a channels-last
    tensor); with many: dense slopes chosen by the coefficients' signs (the gather and scatter cost more)."""
    batch, rows = A.shape[:2]
    index = relaxation.unstable
    if not len(index):
        return A * relaxation.passes.unsqueeze(1), A.new_zeros(batch, rows)
    shared = relaxation.lower_slope.dim() == 2  # else one slope per specification row (alpha-CROWN)
    if shared and len(index) * DENSE_RELU_FRACTION >= relaxation.passes[0].numel():
        return _dense_step(A, *(t.unsqueeze(1) for t in relaxation.dense()))
    out = A * relaxation.passes.unsqueeze(1)
    where = (slice(None), slice(None)) + tuple(torch.unravel_index(index, tuple(A.shape[2:])))
    picked = A[where]  # (B, S, U)
    positive, negative = picked.clamp(min=0), picked.clamp(max=0)
    slope = relaxation.lower_slope.unsqueeze(1) if shared else relaxation.lower_slope
    out[where] = positive * slope + negative * relaxation.upper_slope.unsqueeze(1)
    return out, (negative * relaxation.upper_intercept.unsqueeze(1)).sum(2)


def _dense_step(A: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                intercept: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A ReLU's back-substitution step with dense slopes (each broadcast against A (B, S, ...)): the lower slope
    where a coefficient is positive, the upper one elsewhere; returns ``(A_in, bias term (B, S))``."""
    return A * torch.where(A > 0, lower, upper), (A * intercept).clamp(max=0).sum(tuple(range(2, A.dim())))


# A ReLU step with more than 1 / DENSE_RELU_FRACTION of its neurons unstable runs dense (measured on a
# cpu-scale paper network, 1 thread: the indexed form spent 9 of 30 s gathering and scattering).
DENSE_RELU_FRACTION = 16


def concretize_box(A: torch.Tensor, bias: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """``min over lower <= x <= upper`` of ``A . x + bias``: A (B, S, *shape), box (B, *shape) -> (B, S)."""
    lo, hi = lower.unsqueeze(1), upper.unsqueeze(1)
    return bias + (A.clamp(min=0) * lo + A.clamp(max=0) * hi).flatten(2).sum(2)


def _backward(output: Node, spec: torch.Tensor) -> torch.Tensor:
    """Lower bound of ``spec . output`` over the input box: spec (B, S, *output.shape) -> (B, S)."""
    A, bias, source = back_substitute(output, spec)
    return concretize_box(A, bias, source.data["lower"], source.data["upper"])


def _expand_like(factor: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """A factor shaped like the forward value (B or 1, *shape) or a scalar, as (B or 1, 1, *shape)."""
    if factor.dim() == 0:
        return factor
    if factor.dim() < A.dim() - 1:
        factor = factor.reshape((1,) * (A.dim() - 1 - factor.dim()) + tuple(factor.shape))
    return factor.unsqueeze(1)


def _push(pending: Dict[Node, Tuple[torch.Tensor, int, int]], queue: list, node: Node, A: torch.Tensor,
          top: int = 0, left: int = 0) -> None:
    """Adds coefficients (a window starting at (top, left) on a (C, H, W) node, else the full tensor) to what
    has reached the node; two windows add on the smallest window holding both."""
    if node not in pending:
        pending[node] = (A, top, left)
        heapq.heappush(queue, (-node.order, node))
        return
    B, top2, left2 = pending[node]
    if (top, left) == (top2, left2) and A.shape == B.shape:
        pending[node] = (B + A, top, left)
        return
    first = (min(top, top2), min(left, left2))
    last = (max(top + A.shape[-2], top2 + B.shape[-2]), max(left + A.shape[-1], left2 + B.shape[-1]))
    total = A.new_zeros(*A.shape[:-2], last[0] - first[0], last[1] - first[1])
    for part, part_top, part_left in ((B, top2, left2), (A, top, left)):
        rows, columns = part_top - first[0], part_left - first[1]
        total[..., rows:rows + part.shape[-2], columns:columns + part.shape[-1]] += part
    pending[node] = (total, first[0], first[1])


def _transposable(data: Dict[str, Any]):
    """A convolution's (weight, kernel, stride, padding, dilation) for its transposed convolution: dilation
    written out as zeros between the kernel's taps (torch's CPU transposed convolution with dilation was 7x
    slower than without: 175 vs 23 ms for a depthwise 3x3, dilation 2)."""
    weight = data["weight"]
    stride, padding, dilation = (_pair(data[k]) for k in ("stride", "padding", "dilation"))
    if isinstance(data["padding"], str):
        raise UnsupportedModelError("interval bounds: string padding in a convolution")
    if dilation != (1, 1):
        size = [dilation[i] * (weight.shape[-2 + i] - 1) + 1 for i in range(2)]
        spread = weight.new_zeros(*weight.shape[:2], *size)
        spread[..., ::dilation[0], ::dilation[1]] = weight
        weight, dilation = spread, (1, 1)
    return weight, weight.shape[-2:], stride, padding, dilation


def _conv_backward(A: torch.Tensor, in_shape: Tuple[int, ...], data: Dict[str, Any]) -> torch.Tensor:
    """Coefficients of a convolution's input: the transposed convolution (groups and dilation
    included) of A (B, S, C_out, H_out, W_out), with the output padding that restores the input size."""
    batch, rows = A.shape[:2]
    weight, kernel, stride, padding, dilation = _transposable(data)
    out_h, out_w = A.shape[-2:]
    extra = [in_shape[1 + i] - ((o - 1) * stride[i] - 2 * padding[i] + (kernel[i] - 1) + 1)
             for i, o in enumerate((out_h, out_w))]
    flat = A.reshape(batch * rows, *A.shape[2:])
    if CHANNELS_LAST_ROWS and batch * rows >= CHANNELS_LAST_ROWS and flat.device.type == "cpu":
        flat = flat.contiguous(memory_format=torch.channels_last)
    result = F.conv_transpose2d(flat, weight, None, stride, padding, tuple(extra), data["groups"], dilation)
    return result.reshape(batch, rows, *in_shape)


# Back-substituting many rows at once (full CROWN's intermediate bounds), transposed convolutions in channels-last
# layout ran 3-20x faster on a CPU (oneDNN; 1,024 rows of 8-32 channel maps at 28x28, 1 thread). Few rows (the
# margin rows of certified training) keep the default layout. 0: never.
CHANNELS_LAST_ROWS = 64


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


# ---------------------------------------------------------------- the public call

@dataclass
class MarginBounds:
    """What one bound pass returns. logits: (B, K) clean logits (with graph; None without the clean pass);
    ibp: (B, K) lower bounds on ``logit_y - logit_j`` (0 at j = y); crown_ibp: the same by CROWN-IBP, or
    None if not asked. Where CROWN-IBP was computed only on some rows, the others hold the IBP bound."""
    logits: Optional[torch.Tensor]
    ibp: torch.Tensor
    crown_ibp: Optional[torch.Tensor] = None
    auxiliary: Optional[torch.Tensor] = None
    input_radius: Optional[torch.Tensor] = None
    output_node: Optional[Node] = None

    def relu_inputs(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """IBP bounds ``(lower, upper)`` of every ReLU's input, each (B, *shape), in forward order."""
        if self.output_node is None:
            return []
        found = [n for n in ancestors(self.output_node) | {self.output_node} if n.kind == "relu"]
        return [(n.data["lower"], n.data["upper"]) for n in sorted(found, key=lambda n: n.order)]


def interval_margins(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Union[float, torch.Tensor], *,
                     crown_ibp: bool = False, crown_rows: int = 0, forward: Optional[Callable] = None,
                     clean: bool = True) -> MarginBounds:
    """Sound lower bounds on the margins ``logit_y - logit_j`` over the L-inf ball of radius eps
    around x (intersected with [0, 1]), together with the clean logits, in one forward pass.

    x: (B, ...) pixels in [0, 1]; y: (B,) labels; eps: float or (B,). The model runs in whatever
    mode it is in: in training mode batch norm uses (and updates its running statistics from) the
    clean batch, and bounds hold for the function with those statistics.
    crown_ibp: also back-substitute from the output (CROWN-IBP). crown_rows > 0: only for the
    ``crown_rows`` classes with the lowest IBP margin per sample (the maximum of sound bounds is sound).
    forward: call the model through this (e.g. ``model.forward_with_aux``); it may return a tuple
    whose first item is the logits and second the auxiliary logits.
    clean=False: bounds only, without the clean forward pass (no logits, no auxiliary logits; a third less
    work; training-mode batch norm is refused); the bounds are the same.
    Every bound keeps its autograd graph.
    """
    if x.dim() < 2 or y.shape != (x.shape[0],):
        raise BoundInputError(f"x must be (B, ...) and y (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if forward is None:
        model = sound_view(model, x)  # native pooling and the like, rewritten (verifiers.rewrite)
    start = Interval.from_ball(x, eps, clean)
    out = (forward or model)(start)
    auxiliary = None
    if isinstance(out, tuple):
        out, auxiliary = out[0], out[1]
        if isinstance(auxiliary, Interval):
            auxiliary = auxiliary.value if clean else None
    if not isinstance(out, Interval):
        raise UnsupportedModelError("interval bounds: the model's output does not depend on its input")
    batch, classes = out.center.shape
    spec = _margin_spec(y, classes, out.center.dtype)  # (B, K, K): row j is e_y - e_j
    source = getattr(out, "linear_input", None)
    if source is not None:  # fold the specification into the last linear layer (tighter, as auto_LiRPA does)
        center = out.center.gather(1, y[:, None]) - out.center
        ibp = center - _folded_radius(out.node.data["weight"], source.radius, y)
    else:
        ibp = (out.center - out.radius).gather(1, y[:, None]) - (out.center + out.radius)
    ibp = _zero_diagonal(ibp, y)
    crown = None
    if crown_ibp:
        if crown_rows and crown_rows < classes - 1:
            others = ibp.scatter(1, y[:, None], float("inf"))
            rows = others.topk(crown_rows, dim=1, largest=False).indices  # (B, R)
        else:
            rows = torch.arange(classes, device=y.device).expand(batch, -1)
            rows = rows[rows != y[:, None]].view(batch, classes - 1)
        sub_spec = spec.gather(1, rows[:, :, None].expand(-1, -1, classes))
        bound = _backward(out.node, sub_spec)
        crown = ibp.scatter(1, rows, torch.maximum(bound, ibp.gather(1, rows)) if crown_rows else bound)
        crown = _zero_diagonal(crown, y)
    return MarginBounds(out.value if clean else None, ibp, crown, auxiliary, start.radius, out.node)


def _folded_radius(weight: torch.Tensor, radius: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K): ``|W[y_b] - W[j]| @ radius_b``, the radius of margin j of a final linear layer ``W`` (K, F)
    whose input box has radius ``radius`` (B, F). The absolute row differences are formed once per label
    present (U <= K of them) and applied by one matrix product, not once per sample: with a 3,136-feature
    layer, 10 classes and 64 samples, 8x faster forward and backward than a (B, K, F) batched product."""
    labels, which = torch.unique(y, return_inverse=True)
    pairs = (weight[labels].unsqueeze(1) - weight.unsqueeze(0)).abs()  # (U, K, F)
    every = radius @ pairs.flatten(0, 1).T  # (B, U * K)
    return every.view(y.shape[0], labels.numel(), -1)[torch.arange(y.shape[0], device=y.device), which]


def interval_logit_bounds(model: torch.nn.Module, x: torch.Tensor, eps: Union[float, torch.Tensor], *,
                          crown_ibp: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sound ``(lower, upper)`` bounds, each (B, K), on the logits over the L-inf ball of radius eps
    around x (intersected with [0, 1]), by IBP or CROWN-IBP (two back-substitutions, +-identity rows)."""
    out = sound_view(model, x)(Interval.from_ball(x, eps))
    if not isinstance(out, Interval):
        raise UnsupportedModelError("interval bounds: the model's output does not depend on its input")
    if not crown_ibp:
        return out.center - out.radius, out.center + out.radius
    eye = torch.eye(out.value.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
    return _backward(out.node, eye), -_backward(out.node, -eye)


def _margin_spec(y: torch.Tensor, classes: int, dtype) -> torch.Tensor:
    eye = torch.eye(classes, device=y.device, dtype=dtype)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def _zero_diagonal(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return margins.scatter(1, y[:, None], 0.0)
