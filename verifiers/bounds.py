"""The public bound API: sound bounds on a model's logits over an Lp ball.

``compute_bounds`` and ``margin_lower_bound`` take any ``torch.nn.Module`` built from supported
layers (convolutions, linear layers, batch norm, ReLU, flatten, additions, concatenation,
multiplication by a value that does not depend on the input, and the layers in ``verifiers.layers``).
Native pooling (``nn.AvgPool2d``, ``nn.MaxPool2d``, adaptive pooling with even windows), torchvision's
``Normalize`` and constant arithmetic in an fx graph are rewritten into sound equivalents first
(``verifiers.rewrite``; auto_LiRPA 0.3 bounds padded average pooling unsoundly and rejects stride-1 max
pooling); the bounds are those of the rewritten network, whose outputs equal the model's.

Inputs are in the model's input units (pixels in [0, 1]); for the L-inf norm the ball is
intersected with [0, 1]. For L2 it is not (the full ball is a superset, so bounds stay sound).
"""
from __future__ import annotations

import contextlib
import enum
import math
import warnings
import weakref
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from verifiers import lirpa, rewrite
from verifiers.errors import BoundInputError, UnsupportedModelError
from verifiers.perturbation import Norm, Perturbation, parse_eps, parse_norm  # noqa: F401  (Norm re-exported: one definition)

Eps = Union[float, torch.Tensor]


class BoundMethod(str, enum.Enum):
    IBP = "ibp"
    CROWN_IBP = "crown-ibp"
    CROWN = "crown"
    ALPHA_CROWN = "alpha-crown"

    @classmethod
    def parse(cls, value: Union[str, "BoundMethod"]) -> "BoundMethod":
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(m.value for m in cls)
            raise BoundInputError(f"unknown bound method {value!r}; known methods: {known}") from None

    @property
    def lirpa_name(self) -> str:
        return {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN",
                "alpha-crown": "CROWN-Optimized"}[self.value]


# Module types that are never bounded soundly here, with the replacement to use.
# (verifiers.rewrite replaces them first; these are what remains when a copy was not rewritten)
_REJECTED_MODULES = {
    nn.AvgPool2d: "auto_LiRPA 0.3 gives unsound CROWN bounds on padded average pooling; "
                  "use verifiers.layers.AvgPool2d (or verifiers.rewrite.make_sound)",
    nn.MaxPool2d: "auto_LiRPA 0.3 cannot bound stride-1 max pooling; use verifiers.layers.MaxPool2d",
    nn.AdaptiveAvgPool2d: "use verifiers.layers.GlobalAvgPool or AvgPool2d (fixed convolutions)",
    nn.AdaptiveMaxPool2d: "use verifiers.layers.MaxPool2d with a fixed window",
}

# Graph operations allowed on the input-dependent (perturbed) path. Everything here is either
# linear or ReLU, and every one is exercised by the soundness tests.
_ALLOWED_PERTURBED_NODES = {
    "BoundInput", "BoundConv", "BoundLinear", "BoundMatMul", "BoundRelu", "BoundAdd", "BoundSub",
    "BoundMul", "BoundBatchNormalization", "BoundConcat", "BoundFlatten", "BoundReshape",
    "BoundIdentity", "BoundDropout", "BoundNeg",
}


def check_supported_modules(model: nn.Module) -> None:
    """Raise UnsupportedModelError naming the first layer the engine refuses to bound."""
    for name, module in model.named_modules():
        for bad_type, advice in _REJECTED_MODULES.items():
            if isinstance(module, bad_type):
                raise UnsupportedModelError(
                    f"cannot bound layer {name or '<root>'!r} ({type(module).__name__}): {advice}")


def _check_graph(bounded: "lirpa.BoundedModule", model: nn.Module) -> None:
    for node in bounded._modules.values():
        if not node.perturbed:
            continue
        kind = type(node).__name__
        if kind not in _ALLOWED_PERTURBED_NODES:
            raise UnsupportedModelError(
                f"cannot bound {type(model).__name__}: operation {kind[5:] or kind} "
                f"(graph node {node.name}) on the input path is not supported by the bound engine")
        if kind == "BoundMul" and all(inp.perturbed for inp in node.inputs):
            raise UnsupportedModelError(
                f"cannot bound {type(model).__name__}: a product of two input-dependent values "
                f"(graph node {node.name}) is not supported")


# auto_LiRPA 0.3's IBP represents an L2 ball at the input as the zero-width interval [x, x] plus the
# perturbation; only linear layers (and shape-only nodes passing it on) read the perturbation, any
# other consumer (a Sub, Mul, Add, ReLU, ...) silently bounds the centre point alone. That made L2
# IBP / CROWN-IBP unsound on a network whose first layer was (x - mean) * inv_std (caught by the
# soundness guard of certnas verify; tests/verifiers/test_bounds_api.py).
_LP_AWARE_NODES = {"BoundConv", "BoundLinear", "BoundMatMul"}
_SHAPE_ONLY_NODES = {"BoundFlatten", "BoundReshape", "BoundIdentity", "BoundDropout"}


def _check_l2_input_path(bounded: "lirpa.BoundedModule", model: nn.Module) -> None:
    """Raise UnsupportedModelError unless every consumer of the L2-perturbed input is a linear layer."""
    frontier = [node for node in bounded._modules.values()
                if type(node).__name__ == "BoundInput" and node.perturbed]
    while frontier:
        node = frontier.pop()
        for name in node.output_name:
            child = bounded._modules[name]
            kind = type(child).__name__
            if kind in _SHAPE_ONLY_NODES:
                frontier.append(child)
            elif kind not in _LP_AWARE_NODES:
                raise UnsupportedModelError(
                    f"cannot bound {type(model).__name__} in L2 with IBP / CROWN-IBP: the input goes first into "
                    f"{kind[5:] or kind} (graph node {child.name}), and auto_LiRPA 0.3 bounds an L2 ball soundly "
                    f"only through a first Linear / Conv layer (write input normalisation as a convolution, "
                    f"as certnas' Normalize does, or use --method crown)")


class _ScaledInput(nn.Module):
    """``model(centre + scale * z)``: a per-sample L2 radius becomes a unit ball in ``z``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.model(centre + scale * z)


# model -> {(scaled, conv mode, input shape, device, dtype): (BoundedModule, parameter ids, buffer ids)}
_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict]" = weakref.WeakKeyDictionary()


# verifiers.lirpa patch 20: an intermediate CROWN bound back-substitutes at most this many neurons at a
# time, which bounds its memory (rows x the widest coefficient window: about 1 GB at 28x28, 24 channels).
MAX_CROWN_ROWS = 2048
_SPARSE_OPTIONS = ("sparse_intermediate_bounds", "sparse_conv_intermediate_bounds", "sparse_intermediate_bounds_with_ibp")


def _bound_options(conv_mode: str) -> dict:
    # Sparse alphas break alpha-CROWN on L2 in 0.3 (shape errors in reconstruct_full_alpha); dense is
    # exact, just larger. Sparse intermediate bounds are switched on per call (_bound) for CROWN.
    return {"conv_mode": conv_mode, **{name: False for name in _SPARSE_OPTIONS},
            "sparse_features_alpha": False, "sparse_spec_alpha": False,
            "optimize_bound_args": {"iteration": 20, "lr_alpha": 0.5}}


def _bounded_module(model: nn.Module, x: torch.Tensor, scaled: bool, conv_mode: str) -> "lirpa.BoundedModule":
    """The auto_LiRPA wrapper of ``model`` for inputs shaped like ``x``, traced once and cached."""
    key = (scaled, conv_mode, tuple(x.shape[1:]), x.device, x.dtype)
    param_ids = tuple(id(p) for p in model.parameters())
    buffer_ids = tuple(id(b) for b in model.buffers())
    per_model = _CACHE.setdefault(model, {})
    hit = per_model.get(key)
    if hit is not None and hit[2] != buffer_ids and hit[0]._certnas_rewritten:
        hit = None  # a rewritten copy holds the old buffer tensors: rewrite again
    if hit is not None and hit[1] == param_ids:
        bounded = hit[0]
        if hit[2] != buffer_ids:
            _link_buffers(bounded, bounded._certnas_target)
            per_model[key] = (bounded, param_ids, buffer_ids)
        return bounded
    dummy = torch.zeros((1,) + tuple(x.shape[1:]), device=x.device, dtype=x.dtype)
    # native pooling / normalisation / fx constant arithmetic: bound a sound copy sharing the parameters
    sound = rewrite.make_sound(model, dummy) if rewrite.needs_rewrite(model) else model
    check_supported_modules(sound)
    target = _ScaledInput(sound) if scaled else sound
    args = (dummy, dummy, _scale_shape(torch.ones(1, device=x.device, dtype=x.dtype), x)) if scaled else (dummy,)
    was_training = model.training
    model.eval()  # trace in eval mode so batch norm with batch size 1 is well defined
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bounded = lirpa.BoundedModule(target, args, device=x.device,
                                          bound_opts=_bound_options(conv_mode))
    finally:
        model.train(was_training)
    bounded._certnas_checked = False
    bounded._certnas_rewritten = sound is not model
    for node in bounded._modules.values():
        if type(node).__name__ == "BoundBatchNormalization":
            node.momentum = 0.0  # computing bounds must not move the model's running statistics
    object.__setattr__(bounded, "_certnas_target", target)
    _link_buffers(bounded, target)
    per_model[key] = (bounded, param_ids, buffer_ids)
    return bounded


def _scale_shape(eps_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample radii (B,) shaped to multiply x: (B, C, 1, 1) for images (channel-shaped so that
    patches-mode coefficients accept it), (B, 1, ...) otherwise."""
    if x.dim() == 4:
        return eps_t.view(-1, 1, 1, 1).expand(-1, x.shape[1], 1, 1).contiguous()
    return eps_t.view(-1, *([1] * (x.dim() - 1)))


def _link_buffers(bounded: "lirpa.BoundedModule", target: nn.Module) -> None:
    """Make the wrapper read the model's own buffers (auto_LiRPA 0.3 stores clones taken at trace
    time, so batch-norm running statistics updated by training would be stale)."""
    buffers = dict(target.named_buffers())
    for node in bounded._modules.values():
        if type(node).__name__ == "BoundBuffers" and node.ori_name in buffers:
            node.buffer = buffers[node.ori_name]


def _validate(model: nn.Module, x: torch.Tensor, eps: Eps, norm, method) -> Tuple[torch.Tensor, float, BoundMethod]:
    method = BoundMethod.parse(method)
    norm = parse_norm(norm)
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise BoundInputError(f"x must be a batched tensor (B, ...), got {getattr(x, 'shape', type(x))}")
    if torch.isnan(x).any():
        raise BoundInputError("x contains NaN")
    if x.numel() and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise BoundInputError(f"x must be pixels in [0, 1] (normalisation belongs inside the model), "
                              f"got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
    eps_t = parse_eps(eps, x.shape[0], x)
    return eps_t, norm, method


@contextlib.contextmanager
def full_float32():
    """Convolutions and matrix products in full float32 inside the block. PyTorch runs convolutions on
    Ampere and later GPUs in TF32 by default (a 10-bit mantissa: relative errors near 1e-3), which can
    turn a margin bound that is positive by a few thousandths into a false certificate; on an H200, one
    CROWN margin bound of a cpu-scale paper network came out 0.17% higher (looser is safe, higher is
    not) than in float32 on a CPU. CPUs are unaffected. The settings are restored on exit."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


ENGINES = ("auto", "tape", "lirpa")


def _uses_tape(model: nn.Module, method: BoundMethod, conv_mode: str, sparse: bool, engine: str) -> bool:
    """Whether a bound runs on ``verifiers.crown`` (the tape engine) or on auto_LiRPA: the one place that
    chooses. ``auto``: the tape for crown and alpha-crown on a model in eval mode when no gradient is wanted
    (its bounds are at least as tight and several times faster; training-mode batch norm and gradients of a
    crown bound stay with auto_LiRPA), and auto_LiRPA where its own options (conv_mode, sparse) are set."""
    if engine not in ENGINES:
        raise BoundInputError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if engine != "auto":
        return engine == "tape"
    if method not in (BoundMethod.CROWN, BoundMethod.ALPHA_CROWN) or model.training:
        return False
    if conv_mode != "patches" or not sparse:
        return False
    wants_gradient = method is BoundMethod.CROWN and torch.is_grad_enabled() and \
        any(p.requires_grad for p in model.parameters())
    return not wants_gradient


# alpha-CROWN on the output specification: the settings auto_LiRPA's CROWN-Optimized ran with here
ALPHA_STEPS, ALPHA_LR = 20, 0.5


def tape_options(method: Union[str, BoundMethod]):
    """The ``verifiers.crown`` settings of a bound method that runs on the tape (crown, alpha-crown)."""
    from verifiers.crown import CrownOptions
    method = BoundMethod.parse(method)
    return CrownOptions(output_alpha_steps=ALPHA_STEPS if method is BoundMethod.ALPHA_CROWN else 0, alpha_lr=ALPHA_LR)


def uses_tape(model: nn.Module, method: Union[str, BoundMethod]) -> bool:
    """Whether ``method``'s bounds on ``model`` (default options, no gradient) run on ``verifiers.crown``."""
    with torch.no_grad():
        return _uses_tape(model, BoundMethod.parse(method), "patches", True, "auto")


def _tape_bound(model: nn.Module, x: torch.Tensor, eps_t: torch.Tensor, norm: float, method: BoundMethod,
                C: Optional[torch.Tensor], bound_upper: bool, box: Optional[Tuple[torch.Tensor, torch.Tensor]]):
    from verifiers.crown import linear_bound
    perturbation = Perturbation.input_box(*box) if box is not None else Perturbation(parse_norm(norm), eps_t)
    if C is None:
        classes = _num_classes(model, x)
        C = torch.eye(classes, device=x.device, dtype=x.dtype).expand(x.shape[0], classes, classes)
    rows = C.shape[1]
    spec = torch.cat([C, -C], 1) if bound_upper else C
    bound = linear_bound(model, x, perturbation, spec.to(x.dtype), options=tape_options(method)).lower
    return bound[:, :rows], (-bound[:, rows:] if bound_upper else None)


@full_float32()
def _bound(model: nn.Module, x: torch.Tensor, eps_t: torch.Tensor, norm: float,
           method: BoundMethod, C: torch.Tensor = None, bound_upper: bool = True, conv_mode: str = "patches",
           sparse: bool = True, box: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, engine: str = "auto"):
    if _uses_tape(model, method, conv_mode, sparse, engine):
        try:
            return _tape_bound(model, x, eps_t, norm, method, C, bound_upper, box)
        except UnsupportedModelError:
            if engine == "tape":
                raise  # else a graph the tape cannot trace: auto_LiRPA below
    uniform = bool((eps_t == eps_t[0]).all())
    if norm != math.inf and not uniform and method in (BoundMethod.IBP, BoundMethod.CROWN_IBP):
        # auto_LiRPA 0.3's IBP through the scaled-input wrapper below is unsound for L2 (it
        # returned zero-width intervals), so these methods run one batch per distinct radius.
        return _bound_per_radius(model, x, eps_t, norm, method, C, bound_upper, conv_mode, sparse)
    scaled = norm != math.inf and not uniform
    bounded = _bounded_module(model, x, scaled, conv_mode)
    bounded.train(model.training)
    if norm == math.inf:
        if box is not None:  # an explicit input box, not intersected with [0, 1]
            x_lower, x_upper = box
        else:
            radius = eps_t.view(-1, *([1] * (x.dim() - 1)))
            x_lower = (x - radius).clamp(0.0, 1.0)
            x_upper = (x + radius).clamp(0.0, 1.0)
        perturbation = lirpa.PerturbationLpNorm(norm=math.inf, eps=float(eps_t.max()), x_L=x_lower, x_U=x_upper)
        inputs = (lirpa.BoundedTensor(x, perturbation),)
    elif not scaled:
        perturbation = lirpa.PerturbationLpNorm(norm=2.0, eps=float(eps_t[0]))
        inputs = (lirpa.BoundedTensor(x, perturbation),)
    else:
        z = torch.zeros_like(x)
        inputs = (lirpa.BoundedTensor(z, lirpa.PerturbationLpNorm(norm=2.0, eps=1.0)), x, _scale_shape(eps_t, x))
    if model.training:
        # Training-mode batch norm bounds the function with *this batch's* statistics, which
        # auto_LiRPA 0.3 takes from the last clean forward pass through the wrapper; compute_bounds
        # does not run one, so without this the statistics of an earlier batch were used.
        clean = inputs if not scaled else (torch.zeros_like(x), x, inputs[2])
        bounded(*[t.data if isinstance(t, lirpa.BoundedTensor) else t for t in clean])
    # Sparse intermediate bounds (CROWN, L-inf only): a ReLU input's neurons that IBP from the input,
    # through the bounds already computed, proves stable keep that interval; only the others are
    # back-substituted. A stable neuron's relaxation is exact whatever its bounds, so this changes only
    # which sound bound an intermediate neuron gets (52 s -> 1 s per digit on the default network). Not
    # for L2: auto_LiRPA's IBP of an L2 ball is unsound on some graphs (see _check_l2_input_path and
    # _bound_per_radius), and a wrongly "stable" neuron would make CROWN unsound; the per-sample-eps
    # tests in tests/verifiers/test_soundness.py failed when this was on for L2.
    sparse = sparse and method in (BoundMethod.CROWN, BoundMethod.ALPHA_CROWN) and norm == math.inf
    bounded.bound_opts.update({name: sparse for name in _SPARSE_OPTIONS})
    bounded.bound_opts["certnas_max_rows"] = MAX_CROWN_ROWS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method is BoundMethod.ALPHA_CROWN:
            lower, upper = _alpha_crown(bounded, inputs, C, bound_upper)
        else:
            lower, upper = bounded.compute_bounds(x=inputs, method=method.lirpa_name, C=C, bound_upper=bound_upper)
    if not bounded._certnas_checked:
        _check_graph(bounded, model)
        bounded._certnas_checked = True
    # (after compute_bounds: auto_LiRPA marks the perturbed nodes while computing)
    if norm != math.inf and method in (BoundMethod.IBP, BoundMethod.CROWN_IBP) and not scaled \
            and not getattr(bounded, "_certnas_l2_checked", False):
        _check_l2_input_path(bounded, model)
        bounded._certnas_l2_checked = True
    _release(bounded)
    if method is BoundMethod.ALPHA_CROWN:
        lower = lower.detach()
        upper = upper.detach() if upper is not None else None
    return lower, upper


def _alpha_crown(bounded: "lirpa.BoundedModule", inputs, C, bound_upper: bool):
    """alpha-CROWN with the alphas of the output specification optimised and the intermediate bounds
    of one CROWN pass held fixed (verifiers.lirpa patch 17): memory linear in the network, where
    auto_LiRPA 0.3's alphas for every intermediate node needed more than 24 GB for one digit of the
    default DARTS network."""
    with torch.no_grad():
        bounded.compute_bounds(x=inputs, method="CROWN", C=C, bound_upper=False)
    final = bounded.final_name
    fixed = {name: (node.lower.detach(), node.upper.detach()) for name, node in bounded._modules.items()
             if name != final and node.inputs and getattr(node, "perturbed", False)
             and isinstance(getattr(node, "lower", None), torch.Tensor)
             and isinstance(getattr(node, "upper", None), torch.Tensor)}
    bounded.bound_opts["certnas_output_alpha_only"] = True
    try:
        with torch.enable_grad():
            return bounded.compute_bounds(x=inputs, method="CROWN-Optimized", C=C, bound_upper=bound_upper,
                                          intermediate_layer_bounds=fixed)
    finally:
        bounded.bound_opts["certnas_output_alpha_only"] = False


def _release(bounded: "lirpa.BoundedModule") -> None:
    """Drop the per-call tensors auto_LiRPA leaves on every node (intermediate bounds, forward
    values, coefficient matrices). The cached wrapper would otherwise hold them, and the graphs
    they reference, until the next call: gigabytes on a supernet (the bound benchmark ran out of
    24 GB of memory). The returned bounds keep their own graph."""
    for node in bounded._modules.values():
        for name in ("lower", "upper", "interval", "forward_value", "lA", "uA", "linear", "d", "lower_d"):
            if name in node.__dict__:
                delattr(node, name)


def _bound_per_radius(model, x, eps_t, norm, method, C, bound_upper, conv_mode, sparse):
    lower_parts, upper_parts, order = [], [], []
    for radius in torch.unique(eps_t):
        index = (eps_t == radius).nonzero().flatten()
        if model.training:
            # training-mode batch norm takes the batch's statistics: a subset would be another function,
            # so the whole batch is bounded at this radius and the rows of this radius kept
            lower, upper = _bound(model, x, radius.expand(len(x)), norm, method, C, bound_upper, conv_mode, sparse)
            lower, upper = lower[index], (upper[index] if bound_upper else None)
        else:
            lower, upper = _bound(model, x[index], eps_t[index], norm, method,
                                  None if C is None else C[index], bound_upper, conv_mode, sparse)
        lower_parts.append(lower)
        upper_parts.append(upper)
        order.append(index)
    inverse = torch.argsort(torch.cat(order))
    lower = torch.cat(lower_parts)[inverse]
    upper = torch.cat(upper_parts)[inverse] if bound_upper else None
    return lower, upper


def compute_bounds(model: nn.Module, x: torch.Tensor, eps: Eps, *, norm: Union[float, str] = math.inf,
                   method: Union[str, BoundMethod] = "crown-ibp",
                   conv_mode: str = "patches", sparse: bool = True,
                   engine: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Sound bounds on the logits over the Lp ball of radius ``eps`` around ``x``.

    x: (B, ...) in [0, 1]; eps: float or (B,), >= 0; norm: inf or 2.
    Returns ``(lower, upper)``, each (B, K): for every input in the ball, lower <= logits <= upper.
    Keeps the autograd graph for ibp, crown-ibp and crown (not alpha-crown). conv_mode: how
    auto_LiRPA represents the coefficients of convolutions, ``patches`` (local, fast; every method
    uses it since verifiers.lirpa patches 12 to 16 fixed its grouped / dilated convolutions and its
    handling of patches) or ``matrix`` (dense; the same bounds, far slower: for cross-checks).
    sparse (crown, L-inf only): back-substitute only the intermediate neurons that IBP does not prove
    stable (fast; a stable neuron keeps its IBP interval); False bounds every neuron by back-substitution.
    Which neurons are skipped is decided for the whole batch (a neuron unstable for any sample is
    back-substituted for all), so sparse bounds can differ slightly with the batch they are computed in.
    engine: ``auto`` (crown and alpha-crown on ``verifiers.crown`` where it applies, see ``_uses_tape``),
    ``tape`` or ``lirpa`` (auto_LiRPA; conv_mode and sparse are its options).
    """
    eps_t, norm, method = _validate(model, x, eps, norm, method)
    if conv_mode not in ("patches", "matrix"):
        raise BoundInputError(f"unknown conv_mode {conv_mode!r}; known: patches, matrix")
    return _bound(model, x, eps_t, norm, method, conv_mode=conv_mode, sparse=sparse, engine=engine)


def box_bounds(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, *, C: Optional[torch.Tensor] = None,
               method: Union[str, BoundMethod] = "crown", sparse: bool = True,
               engine: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Sound bounds on ``C @ model(x)`` (or the outputs when C is None) over the box ``lower <= x <= upper``.

    lower, upper: (B, ...) with lower <= upper, any finite values (not limited to [0, 1]); C: (B, S, K).
    Returns ``(lower, upper)``, each (B, S) (or (B, K))."""
    method = BoundMethod.parse(method)
    box = Perturbation.input_box(lower, upper)  # validates the box
    centre = (lower + upper) / 2
    return _bound(model, centre, box.eps, math.inf, method, C=C, sparse=sparse, box=(lower, upper), engine=engine)


def margin_specification(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows ``e_y - e_j`` for every ``j != y``: shape (B, K - 1, K)."""
    eye = torch.eye(num_classes, device=y.device)
    others = torch.arange(num_classes, device=y.device).expand(len(y), -1)
    others = others[others != y.unsqueeze(1)].view(len(y), num_classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


def _margin_rows(model, x, y, eps, norm, method, engine: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, int]:
    eps_t, norm, method = _validate(model, x, eps, norm, method)
    y = torch.as_tensor(y, device=x.device)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise BoundInputError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if y.dtype.is_floating_point:
        raise BoundInputError("y must hold integer class labels")
    y = y.long()
    num_classes = _num_classes(model, x)
    if (y < 0).any() or (y >= num_classes).any():
        raise BoundInputError(f"labels must lie in [0, {num_classes - 1}], got {y.min().item()}..{y.max().item()}")
    C = margin_specification(y, num_classes).to(x.dtype)
    lower, _ = _bound(model, x, eps_t, norm, method, C=C, bound_upper=False, engine=engine)
    return lower, y, num_classes


def margin_lower_bound(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Eps, *,
                       norm: Union[float, str] = math.inf,
                       method: Union[str, BoundMethod] = "crown-ibp", engine: str = "auto") -> torch.Tensor:
    """Lower bound on ``min_{j != y} (logit_y - logit_j)`` over the ball; > 0 means certified.

    x: (B, ...) in [0, 1]; y: (B,) integer labels; eps: float or (B,). Returns (B,).
    Computed with a specification matrix (the margin is bounded as one linear function of the
    logits), which is tighter than subtracting logit bounds.
    """
    return _margin_rows(model, x, y, eps, norm, method, engine)[0].min(dim=1).values


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Eps, *,
                        norm: Union[float, str] = math.inf,
                        method: Union[str, BoundMethod] = "crown-ibp", engine: str = "auto") -> torch.Tensor:
    """Per-class lower bounds ``m_j <= logit_y - logit_j`` over the ball, (B, K), 0 at ``j = y``.

    ``cross_entropy(-m, y)`` is the certified-training loss of IBP / CROWN-IBP: an upper bound on
    the worst-case cross entropy in the ball.
    """
    rows, y, num_classes = _margin_rows(model, x, y, eps, norm, method, engine)
    full = torch.zeros(len(y), num_classes, device=rows.device, dtype=rows.dtype)
    others = torch.arange(num_classes, device=y.device).expand(len(y), -1)
    others = others[others != y.unsqueeze(1)].view(len(y), num_classes - 1)
    return full.scatter(1, others, rows)


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    cached = getattr(model, "_certnas_num_classes", None)
    if cached is not None:
        return cached
    was_training = model.training
    model.eval()
    with torch.no_grad():
        num_classes = int(model(x[:1]).shape[-1])
    model.train(was_training)
    object.__setattr__(model, "_certnas_num_classes", num_classes)
    return num_classes

