"""Exact verification of small ReLU networks by mixed-integer linear programming (scipy / HiGHS).

Supported: an ``nn.Sequential`` (nested Sequentials are flattened) or an fx graph that is a chain of
modules (a converted ONNX file) of affine layers (Linear, Conv2d, eval-mode BatchNorm, Flatten,
Identity, and modules that declare ``is_affine = True``) and ReLU.
The L-inf ball intersected with [0, 1] (``exact_margin``) or any box (``exact_minimum``). This module does not use auto_LiRPA: its big-M
constants come from its own float64 interval arithmetic, so it is an independent check of the
bound engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx
import torch.nn as nn
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, identity, vstack

from verifiers.errors import BoundInputError, UnsupportedModelError

_AFFINE_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten,
                                   nn.Identity)


@dataclass(frozen=True)
class MilpResult:
    """The exact minimum margin (``None`` if the solver stopped early) and solver status."""
    margin: float | None
    optimal: bool
    message: str
    x: Optional[np.ndarray] = None  # the minimiser's input (flattened), when solved


def _affine_like(module: nn.Module) -> bool:
    """A torch affine layer, or a module that declares ``is_affine = True`` (a fixed linear map
    plus constant, e.g. certnas' rewritten average pooling)."""
    return isinstance(module, _AFFINE_TYPES) or getattr(module, "is_affine", False) is True


def _fx_chain(model: "torch.fx.GraphModule") -> Optional[List[nn.Module]]:
    """The modules of an fx graph that is a plain chain (each module applied to the previous output)."""
    chain, previous = [], None
    for node in model.graph.nodes:
        if node.op == "placeholder" and previous is None:
            previous = node
        elif node.op == "call_module" and node.args == (previous,) and not node.kwargs:
            chain.append(model.get_submodule(node.target))
            previous = node
        elif node.op == "output" and node.args == (previous,):
            return chain
        else:
            return None
    return None


def _flatten(model: nn.Module) -> List[nn.Module]:
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in _flatten(child)]
    if isinstance(model, torch.fx.GraphModule):  # e.g. a network converted from ONNX
        chain = _fx_chain(model)
        if chain is not None:
            return [leaf for child in chain for leaf in _flatten(child)]
    return [model]


def relu_layers(model: nn.Module, input_shape: Sequence[int]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """The network as alternating affine maps: ``[(W1, b1), ..., (WL, bL)]`` with a ReLU between.

    Each affine map is read off by evaluating the (affine) modules on the identity basis in float64.
    """
    modules = _flatten(model)
    groups: List[List[nn.Module]] = [[]]
    for module in modules:
        if isinstance(module, nn.ReLU):
            groups.append([])
        elif _affine_like(module):
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.training:
                raise UnsupportedModelError("MILP needs eval-mode batch norm: call model.eval()")
            groups[-1].append(module)
        else:
            raise UnsupportedModelError(f"MILP supports Linear, Conv2d, BatchNorm, Flatten and ReLU; got {type(module).__name__}")
    layers = []
    shape = tuple(input_shape)
    with torch.no_grad():
        for group in groups:
            n_in = int(np.prod(shape))
            basis = torch.cat([torch.zeros(1, n_in), torch.eye(n_in)]).double().view(n_in + 1, *shape)
            out = basis
            for module in group:
                out = _run_double(module, out)
            out_shape = tuple(out.shape[1:])
            flat = out.reshape(n_in + 1, -1).numpy()
            bias = flat[0]
            weight = (flat[1:] - bias).T  # (n_out, n_in)
            layers.append((weight, bias))
            shape = out_shape
    return layers


def _run_double(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import copy
    return copy.deepcopy(module).double()(x)


def _interval(layers, lower: np.ndarray, upper: np.ndarray):
    """Pre-activation bounds of each hidden layer by interval arithmetic (float64, padded)."""
    bounds = []
    for index, (weight, bias) in enumerate(layers[:-1]):
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        mid = weight @ centre + bias
        rad = np.abs(weight) @ radius
        pad = 1e-7 * (1 + np.abs(mid) + rad)
        pre_lower, pre_upper = mid - rad - pad, mid + rad + pad
        bounds.append((pre_lower, pre_upper))
        lower, upper = np.maximum(pre_lower, 0), np.maximum(pre_upper, 0)
    return bounds


def exact_margin(model: nn.Module, x: torch.Tensor, y: int, eps: float, *, time_limit: float = 60.0,
                 max_relus: int = 2000) -> MilpResult:
    """Exact ``min_{j != y} logit_y - logit_j`` over ``{x' : |x' - x|_inf <= eps} ∩ [0, 1]``.

    x: one input without batch dimension, e.g. (C, H, W). Raises UnsupportedModelError for
    unsupported layers or more than ``max_relus`` ReLUs.
    """
    if eps < 0 or math.isnan(eps):
        raise BoundInputError(f"eps must be >= 0, got {eps}")
    layers = relu_layers(model, tuple(x.shape))
    relus = sum(len(b) for _, b in layers[:-1])
    if relus > max_relus:
        raise UnsupportedModelError(f"network has {relus} ReLUs; MILP is limited to {max_relus}")
    centre = x.detach().double().flatten().numpy()
    lower = np.clip(centre - eps, 0, 1)
    upper = np.clip(centre + eps, 0, 1)
    pre_bounds = _interval(layers, lower, upper)
    num_classes = layers[-1][0].shape[0]
    best = MilpResult(math.inf, True, "optimal")
    for j in range(num_classes):
        if j == y:
            continue
        c = np.zeros(num_classes)
        c[y], c[j] = 1.0, -1.0
        result = _solve(layers, pre_bounds, lower, upper, c, time_limit)
        if result.margin is None:
            return result
        if result.margin < best.margin:
            best = result
    return best


def exact_minimum(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, c: np.ndarray, *,
                  time_limit: float = 60.0, max_relus: int = 2000) -> MilpResult:
    """Exact ``min c @ model(x)`` over the box ``lower <= x <= upper`` (one input without batch dimension;
    ``c``: one coefficient per output). ``margin`` of the result holds the minimum."""
    layers = relu_layers(model, tuple(lower.shape))
    relus = sum(len(b) for _, b in layers[:-1])
    if relus > max_relus:
        raise UnsupportedModelError(f"network has {relus} ReLUs; MILP is limited to {max_relus}")
    low = lower.detach().double().flatten().numpy()
    high = upper.detach().double().flatten().numpy()
    c = np.asarray(c, dtype=np.float64)
    if c.shape != (layers[-1][0].shape[0],):
        raise BoundInputError(f"c must hold one coefficient per output ({layers[-1][0].shape[0]}), got {c.shape}")
    return _solve(layers, _interval(layers, low, high), low, high, c, time_limit)


def _solve(layers, pre_bounds, lower, upper, c, time_limit) -> MilpResult:
    # Variables: x (n0), then per hidden layer: z (pre), a (post), d (binary).
    blocks_lb, blocks_ub, integrality = [lower], [upper], [np.zeros(len(lower))]
    offsets = []
    cursor = len(lower)
    for pre_lower, pre_upper in pre_bounds:
        n = len(pre_lower)
        offsets.append((cursor, cursor + n, cursor + 2 * n))
        blocks_lb += [pre_lower, np.maximum(pre_lower, 0), np.zeros(n)]
        blocks_ub += [pre_upper, np.maximum(pre_upper, 0), np.ones(n)]
        integrality += [np.zeros(n), np.zeros(n), np.ones(n)]
        cursor += 3 * n
    total = cursor
    rows, lbs, ubs = [], [], []
    previous = (0, len(lower))  # the slice of the previous activation
    for (weight, bias), (pre_lower, pre_upper), (z0, a0, d0) in zip(layers[:-1], pre_bounds, offsets):
        n = len(bias)
        # z - W prev = b
        W = coo_matrix(weight)
        rows.append(_place(-W, previous[0], total, extra=[(z0, identity(n))]))
        lbs.append(bias); ubs.append(bias)
        # a >= z  ->  a - z >= 0
        rows.append(_place(identity(n), a0, total, extra=[(z0, -identity(n))])); lbs.append(np.zeros(n)); ubs.append(np.full(n, np.inf))
        # a <= z - l (1 - d)  ->  a - z - l d <= -l
        rows.append(_place(identity(n), a0, total, extra=[(z0, -identity(n)), (d0, coo_matrix(np.diag(-pre_lower)))]))
        lbs.append(np.full(n, -np.inf)); ubs.append(-pre_lower)
        # a <= u d  ->  a - u d <= 0
        rows.append(_place(identity(n), a0, total, extra=[(d0, coo_matrix(np.diag(-pre_upper)))]))
        lbs.append(np.full(n, -np.inf)); ubs.append(np.zeros(n))
        previous = (a0, n)
    weight, bias = layers[-1]
    objective = np.zeros(total)
    objective[previous[0]:previous[0] + previous[1]] = c @ weight
    constant = float(c @ bias)
    constraints = LinearConstraint(vstack(rows).tocsr(), np.concatenate(lbs), np.concatenate(ubs)) if rows else ()
    result = milp(objective, constraints=constraints, integrality=np.concatenate(integrality),
                  bounds=Bounds(np.concatenate(blocks_lb), np.concatenate(blocks_ub)),
                  options={"time_limit": time_limit, "mip_rel_gap": 0.0})
    if result.status != 0 or result.x is None:
        return MilpResult(None, False, result.message)
    return MilpResult(float(result.fun) + constant, True, "optimal", np.asarray(result.x[:len(lower)]))


def _place(block, start: int, total: int, extra=()):
    """A row block with ``block`` at column ``start`` and each ``(column, matrix)`` of ``extra``."""
    pieces = [(start, coo_matrix(block))] + [(col, coo_matrix(m)) for col, m in extra]
    n_rows = pieces[0][1].shape[0]
    data, r, cidx = [], [], []
    for col, m in pieces:
        data.append(m.data); r.append(m.row); cidx.append(m.col + col)
    return coo_matrix((np.concatenate(data), (np.concatenate(r), np.concatenate(cidx))), shape=(n_rows, total))
