"""Full CROWN in plain PyTorch: linear bounds on a network's outputs, with every ReLU relaxed from
pre-activation bounds that are themselves linear (not interval) bounds.

The model runs once on an :class:`~verifiers.interval.Interval` (the tape: every operation with its IBP
box). Then the nodes are visited in order, each ReLU's pre-activation bounds fixed before its relaxation:

1. **Forward-mode linear bounds** for every neuron at once: each node carries ``L(x) <= z <= U(x)``, two
   affine functions of the input (coefficients (B, D, *shape), D the input size), pushed through each
   layer (the positive and negative parts of its weights) and through each relaxed ReLU. One sweep costs
   about D forward passes and bounds all neurons; where no ReLU lies between the input and a neuron it
   is exact.
2. **Back-substitution** (CROWN's backward pass, ``interval.back_substitute``) for the neurons the
   forward bounds leave unstable, in chunks of rows: tighter, since it lets the relaxations of the
   layers in between cancel, but it costs a pass over the network per row. ``backsubstitution="adaptive"``
   first back-substitutes a seeded sample of ``probe_rows`` unstable rows of a node and does the rest
   only if that narrowed their intervals by at least ``min_gain``; ``"all"`` does every unstable row.
3. The tightest of the bounds found (IBP, forward, backward; the intersection of sound bounds is sound)
   fixes the ReLU's CROWN relaxation.

Which neurons get back-substituted changes only how tight a bound is, never whether it is sound.

The result is a :class:`LinearBound`: ``spec . f(x') >= A . x' + bias`` for every x' in the perturbation.
Because every relaxation was made for the ball of radius eps, the same A and bias hold for every smaller
ball: ``LinearBound.largest_eps`` reads a certified radius off one pass (``verifiers.radius``).

Supports what the interval tape supports (convolutions of any stride, padding, dilation and groups,
linear layers, batch norm, ReLU, sums, concatenation, constant affine maps, reshapes); L-inf and L2 balls
and explicit input boxes. Soundness is shown by tests/verifiers/test_crown.py, which does not trust this
code (sampled and PGD-searched points, exact MILP minima, auto_LiRPA's CROWN).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from verifiers import interval
from verifiers.errors import BoundInputError, UnsupportedModelError
from verifiers.interval import Interval, Node, ReluRelaxation, back_substitute
from verifiers.perturbation import Norm, Perturbation
from verifiers.rewrite import sound_view

__all__ = ["CrownOptions", "LinearBound", "Tape", "bounded_tape", "linear_bound", "trace"]


@dataclass(frozen=True)
class CrownOptions:
    """How intermediate bounds are computed (all choices give sound bounds; they differ in tightness and
    cost). backsubstitution: ``adaptive``, ``all`` or ``none`` (forward bounds only); reference: ``forward``
    (forward-mode linear bounds, falling back to ``ibp`` where their coefficients would exceed
    ``forward_bytes``) or ``ibp``; chunk_rows: rows back-substituted at once (64-256 ran fastest on a CPU;
    512 took 1.4x as long). window_tile > 0: on (C, H, W) maps the neurons are taken tile by tile (window_tile
    x window_tile positions, every channel) and each chunk's rows are back-substituted as a window of the map
    (``interval.back_substitute``'s origin; the same bounds, at the cost of the area the chunk reaches: on a
    cpu-scale paper network a 4 x 4 tile cut the area of the 28 x 28 maps' transposed convolutions to about
    40%); 0: chunks in index order over the full map. output_alpha_steps > 0: alpha-CROWN on the specification rows, with the
    intermediate bounds fixed: the lower slopes of unstable ReLUs, one set per row, optimised by Adam
    (``alpha_lr``) for that many steps, keeping each row's best bound."""
    backsubstitution: str = "adaptive"
    reference: str = "forward"
    probe_rows: int = 64
    min_gain: float = 0.05
    chunk_rows: int = 128
    window_tile: int = 4
    forward_bytes: int = 3 * 2 ** 30
    output_alpha_steps: int = 0
    alpha_lr: float = 0.5

    def __post_init__(self):
        if self.backsubstitution not in ("adaptive", "all", "none"):
            raise BoundInputError(f"backsubstitution must be adaptive, all or none, got {self.backsubstitution!r}")
        if self.reference not in ("forward", "ibp"):
            raise BoundInputError(f"reference must be forward or ibp, got {self.reference!r}")
        if self.probe_rows < 1 or self.chunk_rows < 1 or not 0 <= self.min_gain <= 1 or self.window_tile < 0:
            raise BoundInputError("probe_rows and chunk_rows must be >= 1, window_tile >= 0 and min_gain in [0, 1]")
        if self.output_alpha_steps < 0 or self.alpha_lr <= 0:
            raise BoundInputError("output_alpha_steps must be >= 0 and alpha_lr > 0")


@dataclass
class LinearBound:
    """``spec . f(x') >= A . x' + bias`` for every x' in ``perturbation`` around ``x``, and (for a ball) in
    every smaller ball around x. A: (B, S, *input shape); bias: (B, S); ``lower``: the bound at the
    perturbation itself, (B, S). ``unstable``: ReLU neurons left unstable per sample (B,). ``relu_bounds``:
    the pre-activation bounds of every ReLU (valid for every smaller ball too: a ``prior`` of later calls)."""
    A: torch.Tensor
    bias: torch.Tensor
    x: torch.Tensor
    perturbation: Perturbation
    lower: torch.Tensor
    unstable: torch.Tensor
    backsubstituted_rows: int = 0
    relu_bounds: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None  # per ReLU, in order: (lower, upper)
    plan: Optional[List[bool]] = None  # per ReLU: whether every neuron left unstable was back-substituted

    def lower_at(self, eps: torch.Tensor) -> torch.Tensor:
        """(B, S) lower bounds over the balls of radii ``eps`` (B,); sound where eps <= the computed radius."""
        return self.perturbation.minimum(self.A, self.bias, self.x, eps)

    def largest_eps(self, threshold: torch.Tensor, upto: Optional[torch.Tensor] = None,
                    iterations: int = 48) -> torch.Tensor:
        """Per sample, the largest eps in [0, upto] (default: the computed radius) at which every row's bound
        exceeds ``threshold`` (B,); -1 where even eps = 0 does not. Beyond the computed radius the value is an
        extrapolation (not a certificate): pass a larger ``upto`` only to predict. (B,)"""
        if self.perturbation.box is not None:
            raise BoundInputError("an explicit input box has no radius to read off")
        eps = self.perturbation.eps
        upto = eps if upto is None else upto
        zero = torch.zeros_like(eps)
        ok_zero = (self.lower_at(zero).min(1).values > threshold)
        if self.perturbation.norm is Norm.L2:
            flat = self.A.flatten(2)
            centre = (flat @ self.x.flatten(1).unsqueeze(2)).squeeze(2) + self.bias
            norms = flat.norm(dim=2)
            per_row = torch.where(norms > 0, (centre - threshold.view(-1, 1)) / norms.clamp_min(1e-30),
                                  torch.full_like(norms, float("inf")))
            value = torch.minimum(per_row.min(1).values, upto)
        else:  # the clipped L-inf ball: the bound is convex and non-increasing in eps, so bisect
            low, high = zero.clone(), upto.clone()
            ok_high = self.lower_at(high).min(1).values > threshold
            for _ in range(iterations):
                middle = (low + high) / 2
                ok = self.lower_at(middle).min(1).values > threshold
                low = torch.where(ok, middle, low)
                high = torch.where(ok, high, middle)
            value = torch.where(ok_high, upto, low)
        return torch.where(ok_zero, value.clamp_min(0.0), torch.full_like(value, -1.0))


def trace(model: nn.Module, x: torch.Tensor, perturbation: Perturbation) -> Interval:
    """The model run on the bounding box of the perturbation: its output Interval, whose ``node`` is the
    tape (with IBP boxes). x: (B, ...)."""
    lower, upper = perturbation.bounding_box(x)
    out = sound_view(model, x)(Interval.from_box(x, lower, upper))
    if not isinstance(out, Interval):
        raise UnsupportedModelError("crown: the model's output does not depend on its input")
    return out


def _ordered(output: Node) -> List[Node]:
    seen, stack, nodes = set(), [output], []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(node.parents)
    return sorted(nodes, key=lambda n: n.order)


def _value_key(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), hash(value.detach().cpu().numpy().tobytes()))
    if isinstance(value, (list, tuple)):
        return tuple(_value_key(v) for v in value)
    return value


def merge_duplicates(output: Node) -> Tuple[List[Node], Node]:
    """The tape with identical operations on identical inputs made one node (the same function), in order,
    and its output node. A ReLU applied to one value in two places (two edges of a cell taking the same max
    pool of one input) then gets one relaxation, whose coefficients from both uses can cancel, as in
    auto_LiRPA, whose graph optimiser merges such copies. Parents are rewired in place."""
    canonical: Dict[Node, Node] = {}
    seen: Dict[tuple, Node] = {}
    kept = []
    for node in _ordered(output):
        node.parents = tuple(canonical[p] for p in node.parents)
        data = {} if node.kind in ("relu", "input") else node.data
        key = (node.kind, tuple(id(p) for p in node.parents),
               tuple(sorted((name, _value_key(value)) for name, value in data.items())))
        if node.kind == "input" or key not in seen:
            seen[key] = node
            canonical[node] = node
            kept.append(node)
        else:
            canonical[node] = seen[key]
    return _fold_channel_affine(kept), canonical[output]


def _channel_factor(value, channels: int) -> Optional[torch.Tensor]:
    """A constant factor that is a number or shaped (1, C, 1, 1) (batch norm), as (C,); None for any other shape
    (a 1-D factor broadcasts along the width, not the channels)."""
    factor = torch.as_tensor(value)
    if factor.dim() == 0:
        return factor.expand(channels)
    if factor.dim() == 4 and tuple(factor.shape) == (1, channels, 1, 1):
        return factor.reshape(channels)
    return None


def _fold_channel_affine(nodes: List[Node]) -> List[Node]:
    """Each per-channel constant affine map (eval-mode batch norm) that is the only consumer of a convolution
    folded into it: one convolution with scaled weights and a bias (the same function; one pass less in each
    direction)."""
    consumers: Dict[Node, int] = {}
    for node in nodes:
        for parent in node.parents:
            consumers[parent] = consumers.get(parent, 0) + 1
    folded = set()
    for node in nodes:
        if node.kind != "affine" or len(node.parents) != 1:
            continue
        conv = node.parents[0]
        if conv.kind != "conv" or consumers.get(conv) != 1 or len(node.shape) != 3:
            continue
        channels = node.shape[0]
        scale = _channel_factor(node.data["scale"], channels) if node.data["scale"] is not None else None
        shift = _channel_factor(node.data["shift"], channels) if node.data["shift"] is not None else None
        if (node.data["scale"] is not None and scale is None) or (node.data["shift"] is not None and shift is None):
            continue
        weight, bias = conv.data["weight"], conv.data["bias"]
        if scale is not None:
            scale = scale.to(weight)
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = None if bias is None else bias * scale
        if shift is not None:
            bias = shift.to(weight) if bias is None else bias + shift.to(weight)
        node.kind, node.parents = "conv", conv.parents
        node.data = {**conv.data, "weight": weight, "bias": bias}
        folded.add(conv)
    return [n for n in nodes if n not in folded]


# ---------------------------------------------------------------- forward-mode linear bounds

# (L coefficients (B, D, *shape), L bias (B, *shape), U coefficients, U bias): L(x) <= z <= U(x)
State = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _shaped(value, shape_rank: int) -> torch.Tensor:
    """A constant factor shaped to broadcast over (B, *shape)."""
    factor = torch.as_tensor(value)
    if 0 < factor.dim() < shape_rank + 1:
        factor = factor.reshape((1,) * (shape_rank + 1 - factor.dim()) + tuple(factor.shape))
    return factor


def _with_input_axis(factor: torch.Tensor) -> torch.Tensor:
    return factor.unsqueeze(1) if factor.dim() > 0 else factor


def _exact(state: State) -> bool:
    """Whether a forward-mode state's lower and upper functions are one (no ReLU relaxed on its way from the input):
    then a linear node maps it with its whole weight once instead of its positive and negative parts twice."""
    return state[0] is state[2] and state[1] is state[3]


def _forward_step(node: Node, states: Dict[Node, State], batch: int, size: int) -> State:
    """The forward-mode bounds of a linear node from its parents' (every kind but relu and input): the node's map
    (``_linear_map``) of each bound, where a negative coefficient (a subtrahend, a negative scale or weight) takes
    the other bound."""
    kind, data = node.kind, node.data
    if kind == "constant":
        value = data["value"].expand(batch, *node.shape)
        zero = value.new_zeros(batch, size, *node.shape)
        return zero, value, zero, value
    parents = [states[p] for p in node.parents]
    if all(_exact(p) for p in parents):
        weights, biases = _linear_map(node, [p[:2] for p in parents], batch, size)
        return weights, biases, weights, biases
    lower, upper = [p[:2] for p in parents], [p[2:] for p in parents]
    if kind == "sum" and data["signs"][1] < 0:  # a - b: b's upper bound enters the lower one and vice versa
        lower[1], upper[1] = upper[1], lower[1]
    if kind in ("sum", "cat", "reshape") or (kind == "affine" and data["scale"] is None):
        return (*_linear_map(node, lower, batch, size), *_linear_map(node, upper, batch, size))
    # a scale or weight: its positive part maps each bound to itself, its negative part to the other

    def mapped(part: str, state: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return _linear_map(node, [state], batch, size, part=part)
    (lw, lb), (lw_, lb_) = mapped("positive", lower[0]), mapped("negative", upper[0])
    (uw, ub), (uw_, ub_) = mapped("positive", upper[0]), mapped("negative", lower[0])
    Lw, Lb, Uw, Ub = lw + lw_, lb + lb_, uw + uw_, ub + ub_
    offset = _offset(node)
    if offset is not None:
        Lb, Ub = Lb + offset, Ub + offset
    return Lw, Lb, Uw, Ub


def _offset(node: Node) -> Optional[torch.Tensor]:
    """The constant an affine, linear or conv node adds (shift or bias), shaped to broadcast over (B, *shape)."""
    if node.kind == "affine":
        return node.data["shift"]
    bias = node.data["bias"]
    return bias.view(1, -1, 1, 1) if bias is not None and node.kind == "conv" else bias


def _linear_map(node: Node, parents: List[Tuple[torch.Tensor, torch.Tensor]], batch: int, size: int,
                part: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (weights, bias) of a linear node's function of the input from its parents' (each (weights, bias)).
    ``part`` ("positive" / "negative"): map with that part of the node's scale or weight only, without its
    offset (the halves of the map of a relaxed bound)."""
    kind, data = node.kind, node.data
    if kind == "sum":
        (wa, ba), (wb, bb) = parents
        return (wa + wb, ba + bb) if data["signs"][1] > 0 else (wa - wb, ba - bb)
    if kind == "cat":
        dim = data["dim"]
        return torch.cat([p[0] for p in parents], dim + 1), torch.cat([p[1] for p in parents], dim)
    w, b = parents[0]
    if kind == "reshape":
        return w.reshape(batch, size, *node.shape), b.reshape(batch, *node.shape)

    def signed(factor: torch.Tensor) -> torch.Tensor:
        return factor if part is None else factor.clamp(min=0) if part == "positive" else factor.clamp(max=0)
    if kind == "affine":
        if data["scale"] is not None:
            scale = signed(_shaped(data["scale"], len(node.shape)).to(b))
            w, b = w * _with_input_axis(scale), b * scale
    elif kind in ("linear", "conv"):
        weight = signed(data["weight"])
        if kind == "linear":
            w, b = w @ weight.T, b @ weight.T
        else:
            w, b = _conv_rows(w, weight, data), _conv_rows(b, weight, data)
    else:  # pragma: no cover - every kind of the tape is handled
        raise AssertionError(f"unknown node kind {kind}")
    offset = None if part is not None else _offset(node)
    return w, (b if offset is None else b + offset)


def _conv_rows(t: torch.Tensor, weight: torch.Tensor, data: Dict[str, Any]) -> torch.Tensor:
    """The convolution of ``data`` (without bias) over the last three dimensions of ``t``."""
    flat = t.reshape(-1, *t.shape[-3:])
    if flat.shape[0] >= interval.CHANNELS_LAST_ROWS > 0 and flat.device.type == "cpu":
        flat = flat.contiguous(memory_format=torch.channels_last)  # see interval.CHANNELS_LAST_ROWS
    out = F.conv2d(flat, weight, None, data["stride"], data["padding"], data["dilation"], data["groups"])
    return out.reshape(*t.shape[:-3], *out.shape[1:])


def _forward_relu(state: State, relaxation: ReluRelaxation) -> State:
    """Forward-mode bounds through a relaxed ReLU: lower slope * L, upper slope * U + intercept."""
    Lw, Lb, Uw, Ub = state
    lower_slope, upper_slope, intercept = relaxation.dense()
    return (Lw * lower_slope.unsqueeze(1), Lb * lower_slope, Uw * upper_slope.unsqueeze(1),
            Ub * upper_slope + intercept)


def _forward_bounds(state: State, perturbation: Perturbation, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concretised forward bounds (each (B, *shape)) of a state."""
    Lw, Lb, Uw, Ub = state
    batch = Lb.shape[0]
    rows = lambda w: w.reshape(batch, w.shape[1], -1).transpose(1, 2)  # (B, N, D)
    lower = perturbation.minimum(rows(Lw), Lb.reshape(batch, -1), x)
    upper = -perturbation.minimum(rows(-Uw), -Ub.reshape(batch, -1), x)
    return lower.view_as(Lb), upper.view_as(Ub)


# ---------------------------------------------------------------- back-substitution of chosen neurons

def _backward_bounds(node: Node, index: torch.Tensor, perturbation: Perturbation, x: torch.Tensor,
                     batch: int, chunk: int, tile: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """CROWN bounds of the neurons ``index`` (flat, (R,)) of ``node``: (lower, upper), each (B, R). tile > 0 on a
    (C, H, W) node: the neurons in order of tile x tile blocks of the map, each chunk's rows as a window."""
    shape = tuple(node.shape)
    windowed = tile > 0 and len(shape) == 3
    order = torch.arange(len(index), device=index.device)
    if windowed:
        channels, height, width = shape
        row, column = (index // width) % height, index % width
        block = (row // tile) * ((width + tile - 1) // tile) + column // tile
        order = torch.argsort(block * (channels * height * width) + index)
    lowers, uppers = [], []
    for start in range(0, len(index), chunk):
        part = index[order[start:start + chunk]]
        count = len(part)
        if windowed:
            rows = torch.arange(count, device=x.device)
            channel, row, column = part // (height * width), (part // width) % height, part % width
            top, left = int(row.min()), int(column.min())
            window = (channels, int(row.max()) - top + 1, int(column.max()) - left + 1)
            spec = x.new_zeros(batch, 2 * count, *window)
            spec[:, rows, channel, row - top, column - left] = 1.0
            spec[:, count + rows, channel, row - top, column - left] = -1.0
            A, bias, _ = back_substitute(node, spec, origin=(top, left))
        else:
            A, bias, _ = back_substitute(node, neuron_spec(part, shape, batch, x))
        bound = perturbation.minimum(A, bias, x)
        lowers.append(bound[:, :count])
        uppers.append(-bound[:, count:])
    # back to the order of ``index``
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(lowers, 1)[:, inverse], torch.cat(uppers, 1)[:, inverse]


def _tighten(node: Node, lower: torch.Tensor, upper: torch.Tensor, exact: bool, perturbation: Perturbation,
             x: torch.Tensor, options: CrownOptions,
             decided: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor, int, bool]:
    """The pre-activation bounds of a ReLU after back-substituting its unstable neurons as the options say (or,
    where ``decided`` is given, all of them or none); returns (lower, upper, rows back-substituted, whether all
    were). node: the ReLU's input; exact: the bounds given are already the best back-substitution could give
    (forward-mode bounds with no ReLU before the node)."""
    batch = lower.shape[0]
    flat_l, flat_u = lower.reshape(batch, -1), upper.reshape(batch, -1)
    open_ = (flat_l < 0) & (flat_u > 0)
    index = open_.any(0).nonzero().flatten()
    if not len(index) or exact or options.backsubstitution == "none" or decided is False:
        return lower, upper, 0, False
    flat_l, flat_u = flat_l.clone(), flat_u.clone()
    todo, done = index, 0
    if decided is None and options.backsubstitution == "adaptive" and len(index) > 2 * options.probe_rows:
        generator = torch.Generator().manual_seed(len(index))
        order = torch.randperm(len(index), generator=generator).to(index.device)
        probe, todo = index[order[:options.probe_rows]], index[order[options.probe_rows:]]
        before = (flat_u[:, probe] - flat_l[:, probe]).sum()
        _intersect(flat_l, flat_u, probe, *_backward_bounds(node, probe, perturbation, x, batch, options.chunk_rows,
                                                                  options.window_tile))
        done = len(probe)
        gain = 1.0 - float((flat_u[:, probe] - flat_l[:, probe]).sum() / before.clamp_min(1e-30))
        if gain < options.min_gain:
            return flat_l.view_as(lower), flat_u.view_as(upper), done, False
    if len(todo):
        _intersect(flat_l, flat_u, todo, *_backward_bounds(node, todo, perturbation, x, batch, options.chunk_rows,
                                                                 options.window_tile))
        done += len(todo)
    return flat_l.view_as(lower), flat_u.view_as(upper), done, True


def neuron_spec(index: torch.Tensor, shape: Sequence[int], batch: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 2R, *shape) specification bounding the R flat neurons ``index`` of a node from both sides: row r picks
    neuron index[r] (its lower bound), row R + r its negation (minus its upper bound)."""
    count = len(index)
    rows = torch.arange(count, device=index.device)
    spec = like.new_zeros(batch, 2 * count, _numel(shape))
    spec[:, rows, index] = 1.0
    spec[:, count + rows, index] = -1.0
    return spec.view(batch, 2 * count, *shape)


def projected_step(optimiser: torch.optim.Optimizer, parameters: Sequence[torch.Tensor],
                   gradients: Sequence[Optional[torch.Tensor]],
                   ranges: Sequence[Tuple[Optional[float], Optional[float]]]) -> None:
    """One projected-gradient step: ``optimiser`` steps with these gradients, then each parameter is clamped back
    into its range, the set where every bound it gives is sound ([0, 1] for a ReLU's lower slope, [0, inf) for a
    split's multiplier)."""
    for parameter, gradient in zip(parameters, gradients):
        parameter.grad = gradient
    optimiser.step()
    with torch.no_grad():
        for parameter, (low, high) in zip(parameters, ranges):
            parameter.clamp_(low, high)


def _intersect(flat_l, flat_u, index, lower, upper) -> None:
    flat_l[:, index] = torch.maximum(flat_l[:, index], lower)
    flat_u[:, index] = torch.minimum(flat_u[:, index], upper)


# ---------------------------------------------------------------- the public call

@dataclass
class Tape:
    """The model's tape over a perturbation with every ReLU's pre-activation bounds fixed (and relaxed): ready
    for back-substituting specifications, as often as needed (branch and bound re-relaxes it per subdomain).
    nodes: in order; relus: the ReLU nodes, in order; rows / plan / unstable: as in :class:`LinearBound`."""
    output: Node
    nodes: List[Node]
    relus: List[Node]
    x: torch.Tensor
    perturbation: Perturbation
    rows: int
    plan: List[bool]
    unstable: torch.Tensor

    @property
    def relu_bounds(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return [(n.data["lower"], n.data["upper"]) for n in self.relus]


def bounded_tape(model: nn.Module, x: torch.Tensor, perturbation: Perturbation, *,
                 options: CrownOptions = CrownOptions(),
                 prior: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
                 plan: Optional[List[bool]] = None) -> Tape:
    """The tape with full-CROWN bounds on every ReLU's input (see :func:`linear_bound` for prior and plan)."""
    with torch.no_grad():
        out = trace(model, x, perturbation)
        nodes, output = merge_duplicates(out.node)
        batch = x.shape[0]
        size = x[0].numel()
        use_forward = options.reference == "forward" and \
            4 * batch * size * max(_numel(n.shape) for n in nodes) * x.element_size() * 2 <= options.forward_bytes
        states: Dict[Node, State] = {}
        remaining = {n: 0 for n in nodes}
        for node in nodes:
            for parent in node.parents:
                remaining[parent] += 1
        relu_before: Dict[Node, bool] = {}
        unstable = torch.zeros(batch, dtype=torch.long, device=x.device)
        rows = 0
        relus: List[Node] = []
        count = sum(n.kind == "relu" for n in nodes)
        if (prior is not None and len(prior) != count) or (plan is not None and len(plan) != count):
            raise BoundInputError("prior / plan: of another network (the number of ReLU nodes differs)")
        decisions: List[bool] = []
        for node in nodes:
            relu_before[node] = any(relu_before[p] or p.kind == "relu" for p in node.parents)
            if node.kind == "relu":
                parent = node.parents[0]
                lower, upper = node.data["lower"], node.data["upper"]  # IBP on the tape
                if prior is not None:
                    known_lower, known_upper = prior[len(relus)]
                    lower, upper = torch.maximum(lower, known_lower), torch.minimum(upper, known_upper)
                if use_forward:
                    forward_lower, forward_upper = _forward_bounds(states[parent], perturbation, x)
                    lower, upper = torch.maximum(lower, forward_lower), torch.minimum(upper, forward_upper)
                # forward-mode bounds of a neuron with no ReLU before it are exact: nothing to back-substitute
                exact = use_forward and not relu_before[parent]
                lower, upper, done, decision = _tighten(parent, lower, upper, exact, perturbation, x, options,
                                                        None if plan is None else plan[len(relus)])
                rows += done
                decisions.append(decision)
                relaxation = ReluRelaxation.from_bounds(lower, upper)
                node.data.update(lower=lower, upper=upper, relaxation=relaxation)
                relus.append(node)
                unstable += ((lower < 0) & (upper > 0)).reshape(batch, -1).sum(1)
                if use_forward:
                    states[node] = _forward_relu(states[parent], relaxation)
            elif use_forward:
                if node.kind == "input":
                    eye = torch.eye(size, device=x.device, dtype=x.dtype).expand(batch, size, size)
                    zero = x.new_zeros(batch, *node.shape)
                    eye = eye.reshape(batch, size, *node.shape)
                    states[node] = (eye, zero, eye, zero)  # exact: one object for both (see _exact)
                else:
                    states[node] = _forward_step(node, states, batch, size)
            for parent in node.parents:
                remaining[parent] -= 1
                if remaining[parent] == 0:
                    states.pop(parent, None)
    return Tape(output, nodes, relus, x, perturbation, rows, decisions, unstable)


def linear_bound(model: nn.Module, x: torch.Tensor, perturbation: Perturbation, spec: torch.Tensor, *,
                 options: CrownOptions = CrownOptions(),
                 prior: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
                 plan: Optional[List[bool]] = None) -> LinearBound:
    """Full-CROWN linear lower bound of ``spec . model(x')`` over the perturbation around x.

    x: (B, ...); spec: (B, S, K) rows of the specification (e.g. ``e_y - e_j`` for margins). The model runs
    as it is (eval mode for verification). Computed without autograd.
    prior: ``relu_bounds`` of an earlier call on the same model and x over a perturbation that contains this
    one (a ball of the same norm and no smaller radius): sound here too, they start each ReLU's bounds, so
    fewer neurons are unstable and fewer rows are back-substituted. plan: per ReLU, whether to back-substitute
    every neuron left unstable (True) or none (False) instead of deciding by a sample (the ``plan`` of that
    earlier call: the radius search's probes below a failed one replay its decisions on its bounds)."""
    if spec.dim() != 3 or spec.shape[0] != x.shape[0]:
        raise BoundInputError(f"spec must be (B, S, K) with B = {x.shape[0]}, got {tuple(spec.shape)}")
    tape = bounded_tape(model, x, perturbation, options=options, prior=prior, plan=plan)
    with torch.no_grad():
        spec = spec.to(x.dtype)
        A, bias, _ = back_substitute(tape.output, spec)
        lower = perturbation.minimum(A, bias, x)
        if options.output_alpha_steps:
            A, bias, lower = _optimise_output_slopes(tape.output, tape.nodes, spec, perturbation, x, options,
                                                     A, bias, lower)
    return LinearBound(A, bias, x, perturbation, lower, tape.unstable, tape.rows, tape.relu_bounds, tape.plan)


def _optimise_output_slopes(output: Node, nodes: List[Node], spec: torch.Tensor, perturbation: Perturbation,
                            x: torch.Tensor, options: CrownOptions, A: torch.Tensor, bias: torch.Tensor,
                            lower: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha-CROWN on the specification: every unstable ReLU's lower slope (any value in [0, 1] gives a sound
    bound) optimised per row by projected Adam, intermediate bounds fixed; each row keeps the A, bias and bound
    of its best step (rows are bounded independently, so mixing steps across rows stays sound)."""
    rows = spec.shape[1]
    slopes = []
    for node in nodes:
        relaxation = node.data.get("relaxation") if node.kind == "relu" else None
        if relaxation is None or not len(relaxation.unstable):
            continue
        slope = relaxation.lower_slope.unsqueeze(1).expand(-1, rows, -1).clone().requires_grad_(True)
        node.data["relaxation"] = ReluRelaxation(relaxation.passes, relaxation.unstable, slope,
                                                 relaxation.upper_slope, relaxation.upper_intercept)
        slopes.append(slope)
    if not slopes:
        return A, bias, lower
    optimiser = torch.optim.Adam(slopes, lr=options.alpha_lr)
    for _ in range(options.output_alpha_steps):
        with torch.enable_grad():
            step_A, step_bias, _ = back_substitute(output, spec)
            bound = perturbation.minimum(step_A, step_bias, x)
            gradients = torch.autograd.grad(-bound.sum(), slopes)
        better = bound.detach() > lower
        lower = torch.where(better, bound.detach(), lower)
        bias = torch.where(better, step_bias.detach(), bias)
        A = torch.where(better.view(*better.shape, *([1] * (A.dim() - 2))), step_A.detach(), A)
        projected_step(optimiser, slopes, gradients, [(0.0, 1.0)] * len(slopes))
    return A, bias, lower


def _numel(shape) -> int:
    size = 1
    for extent in shape:
        size *= extent
    return size
