"""The verification runner: per-sample statuses by one or more methods, a cascade, certified radii,
and the soundness guard.

Methods are the bound methods of ``verifiers.bounds`` (ibp, crown-ibp, crown, alpha-crown) and
``milp`` (exact, small ReLU MLPs only, L-inf only; see ``verifiers.milp``).

- ``verify_methods``: every listed method on every sample (per-method verified accuracy).
- ``cascade``: a falsifier first (an attack: correctly classified samples it breaks are
  ``falsified``), then the methods in order, each only on the samples still undecided; every
  sample ends ``certified`` (by the first method that proves it), ``falsified`` or ``unknown``.
- ``radii``: the certified radius per sample and method (batched bisection).

A bound method certifies a sample when its margin is positive also against float32 rounding: margins
within ``verifiers.rounding``'s tolerance of 0 are rechecked in float64 (radii: such probes count as not
certified).

The soundness guard: every certificate (a positive margin lower bound at eps, or a certified radius)
is attacked at that eps before it is reported. An attack that succeeds against a certificate means
the engine is wrong, and ``SoundnessError`` stops the run naming the sample and method. The guard
takes the attack as a callable ``falsifier(x, y, eps) -> x_adv`` (eps: (B,)), so this module
depends on no attack library.
"""
from __future__ import annotations

import contextlib
import enum
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from verifiers.bounds import BoundMethod, parse_norm, tape_options, uses_tape
from verifiers.errors import BoundInputError, UnsupportedModelError
from verifiers.rounding import certified_margin

Falsifier = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class VerificationMethod:
    """A method of this runner. exact: its margin is the true minimum (milp); complete: a negative margin
    is a counterexample it found, so it falsifies (milp, bab); full_backsubstitution: a bound per ReLU neuron
    by back-substitution, so its cost grows with the network (``crown_max_relus``, smaller batches); bound:
    the ``verifiers.bounds`` method, if any; linf_only: refuses L2."""
    name: str
    exact: bool = False
    complete: bool = False
    full_backsubstitution: bool = False
    bound: Optional[BoundMethod] = None
    linf_only: bool = False


# the registry, in cascade order (cheap to strong)
REGISTRY: Dict[str, VerificationMethod] = {m.name: m for m in (
    VerificationMethod("ibp", bound=BoundMethod.IBP),
    VerificationMethod("crown-ibp", bound=BoundMethod.CROWN_IBP),
    VerificationMethod("crown", full_backsubstitution=True, bound=BoundMethod.CROWN),
    VerificationMethod("alpha-crown", full_backsubstitution=True, bound=BoundMethod.ALPHA_CROWN),
    VerificationMethod("bab", complete=True, full_backsubstitution=True, linf_only=True),
    VerificationMethod("milp", exact=True, complete=True, linf_only=True),
)}


@dataclass(frozen=True)
class VerifyOptions:
    """What the runners take besides the samples: batch_size (samples bounded at once), milp_time_limit
    (seconds per MILP solve), milp_max_relus / crown_max_relus (the largest networks milp and crown /
    alpha-crown / bab run on; 0: no limit for crown), bab_time_limit (seconds of branch and bound per sample)."""
    batch_size: int = 64
    milp_time_limit: float = 60.0
    milp_max_relus: int = 2000
    crown_max_relus: int = 1_000_000
    bab_time_limit: float = 30.0

    def __post_init__(self):
        if self.batch_size < 1 or self.milp_time_limit <= 0 or self.bab_time_limit <= 0:
            raise BoundInputError("batch_size must be >= 1, milp_time_limit and bab_time_limit > 0")
METHODS = tuple(REGISTRY)
CASCADE_ORDER = METHODS


def get_method(name: str) -> VerificationMethod:
    """The registered method called ``name``; BoundInputError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise BoundInputError(f"unknown method {name!r}; known: {', '.join(METHODS)}, all") from None


class Status(str, enum.Enum):
    CERTIFIED = "certified"
    FALSIFIED = "falsified"
    UNKNOWN = "unknown"


class SoundnessError(RuntimeError):
    """A certified sample was broken by an attack: a bug in the bound engine, never a result."""


@dataclass
class SampleResult:
    """One sample under one method. margin_bound: lower bound on the margin at eps (exact for milp;
    None where not computed); radius: certified radius (``radii`` only)."""
    index: int
    label: int
    prediction: int
    method: str
    status: Status
    margin_bound: Optional[float] = None
    radius: Optional[float] = None
    seconds: float = 0.0

    def row(self) -> Dict[str, object]:
        return {"index": self.index, "label": self.label, "prediction": self.prediction, "method": self.method,
                "status": self.status.value, "certified": self.status is Status.CERTIFIED,
                "margin_bound": self.margin_bound, "radius": self.radius, "seconds": round(self.seconds, 4)}


def parse_methods(text: str) -> List[str]:
    """``"all"`` or a comma-separated list of METHODS, in the given order."""
    if text.strip() == "all":
        return list(CASCADE_ORDER)
    methods = [part.strip() for part in text.split(",") if part.strip()]
    for name in methods:
        get_method(name)
    if not methods:
        raise BoundInputError("no method given")
    return methods


class _CountRelu(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("relu", "relu_") and isinstance(out, torch.Tensor):
            self.count += out[0].numel() if out.dim() > 0 else 1
        return out


def relu_neurons(model: nn.Module, x: torch.Tensor) -> int:
    """Number of ReLU neurons the network evaluates on one input (every relu call, functional or module)."""
    counter = _CountRelu()
    with torch.no_grad(), counter:
        model(x[:1])
    return counter.count


# The default size limit of crown / alpha-crown: the cpu-scale paper networks (up to 260,288 ReLU calls) run
# without raising it (verifiers.crown: about 25 s per bound on 2 threads); far larger networks are refused.
CROWN_MAX_RELUS = VerifyOptions().crown_max_relus


def check_crown_size(model: nn.Module, x: torch.Tensor, method: str, max_relus: int) -> None:
    """Full CROWN computes a bound for every ReLU input by its own back-substitution, so its cost grows
    with the number of ReLU neurons times the depth: refuse networks beyond ``max_relus`` ReLU
    neurons (0: no limit)."""
    if not REGISTRY[method].full_backsubstitution or max_relus <= 0:
        return
    count = relu_neurons(model, x)
    if count > max_relus:
        raise UnsupportedModelError(
            f"{method}: the network has {count} ReLU neurons, more than --crown-max-relus {max_relus}; full CROWN "
            f"back-substitutes the neurons its forward bounds leave unstable, about 25 s per bound at 172,480 ReLUs "
            f"(2 threads). Use ibp or crown-ibp, or raise the limit (0: none)")


# CROWN's coefficient matrices grow with (samples at once) x (ReLU neurons bounded): above this
# many ReLU neurons per batch, crown / alpha-crown bound fewer samples at once (a batch of 8 inputs of
# the default 103,488-ReLU network took more than 22 GB and was killed; one input at a time runs).
CROWN_BATCH_RELUS = 20000


def method_batch_size(model: nn.Module, x: torch.Tensor, method: str, batch_size: int) -> int:
    """``batch_size``, made smaller for crown / alpha-crown on large networks (CROWN_BATCH_RELUS)."""
    if not REGISTRY[method].full_backsubstitution:
        return batch_size
    return max(1, min(batch_size, CROWN_BATCH_RELUS // max(1, relu_neurons(model, x))))


def check_milp_supported(model: nn.Module, input_shape: Sequence[int], norm: float, max_relus: int) -> None:
    """Raise UnsupportedModelError (with the reason) unless ``milp`` can verify this model."""
    from verifiers.milp import relu_layers
    if norm != math.inf:
        raise UnsupportedModelError("milp verifies the L-inf norm only")
    layers = relu_layers(model, tuple(input_shape))
    relus = sum(len(bias) for _, bias in layers[:-1])
    if relus > max_relus:
        raise UnsupportedModelError(f"milp: the network has {relus} ReLUs, more than --milp-max-relus {max_relus}")


def _milp_margins(model, x, y, eps: torch.Tensor, time_limit: float, max_relus: int, progress=None) -> List[Optional[float]]:
    from verifiers.milp import exact_margin
    margins = []
    for i in range(len(x)):
        result = exact_margin(model, x[i], int(y[i]), float(eps[i]), time_limit=time_limit, max_relus=max_relus)
        margins.append(result.margin if result.optimal else None)
        if progress is not None:
            progress(1)
    return margins


def margins_by(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: float, method: str, *,
               options: VerifyOptions = VerifyOptions(), progress: Optional[Callable[[int], None]] = None,
               counts: Optional[Dict[str, int]] = None) -> List[Optional[float]]:
    """Margin lower bound per sample: the exact minimum for milp (None where it hit its time limit); for bab
    the smallest bound over the verified subdomains, or the margin of a counterexample found (< 0), or None
    at its time limit; a bound method's margins near 0 are rechecked in float64
    (``verifiers.rounding.certified_margin``), and ``counts`` (optional) gets the number ``rechecked`` and
    ``rejected`` by that check added."""
    if REGISTRY[method].exact:
        return _milp_margins(model, x, y, eps, options.milp_time_limit, options.milp_max_relus, progress)
    if method == "bab":
        return _bab_margins(model, x, y, eps, options.bab_time_limit, progress)
    out: List[Optional[float]] = []
    batch_size = method_batch_size(model, x, method, options.batch_size)
    with torch.no_grad() if REGISTRY[method].bound is not BoundMethod.ALPHA_CROWN else contextlib.nullcontext():
        for start in range(0, len(x), batch_size):
            part = slice(start, start + batch_size)
            bound = certified_margin(model, x[part], y[part], eps[part], norm=norm, method=method, counts=counts)
            out.extend(float(v) for v in bound.detach())
            if progress is not None:
                progress(len(x[part]))
    return out


def _bab_margins(model, x, y, eps: torch.Tensor, time_limit: float, progress) -> List[Optional[float]]:
    """Branch and bound per sample (``bab_sample``): the proven margin, a counterexample's margin, or None."""
    out: List[Optional[float]] = []
    for i in range(len(x)):
        found = bab_sample(model, x[i:i + 1], int(y[i]), float(eps[i]), time_limit)
        out.append(found.proven_margin if found.verdict == "unsat" else
                   found.counterexample if found.verdict == "sat" else None)
        if progress is not None:
            progress(1)
    return out


def bab_sample(model: nn.Module, x: torch.Tensor, label: int, eps: float, time_limit: float):
    """``verifiers.bab.BabResult`` of branch and bound on the L-inf ball of ``eps`` around ``x`` (1, ...)
    (intersected with [0, 1]): is every margin row of ``label`` positive? A counterexample is its margin."""
    from verifiers.bab import Specification, relu_branch_and_bound
    from verifiers.bounds import margin_specification
    from verifiers.rounding import RTOL, logit_scale
    with torch.no_grad():
        classes = model(x).shape[1]
        scale = float(logit_scale(model, x)[0])
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    rows = margin_specification(torch.tensor([label], device=x.device), classes)[0].to(x.dtype)
    spec = Specification(rows, torch.zeros(classes - 1, dtype=x.dtype, device=x.device),
                         [[r] for r in range(classes - 1)],
                         torch.full((classes - 1,), RTOL * scale, dtype=x.dtype, device=x.device))

    def falsify(candidates: torch.Tensor):
        with torch.no_grad():
            logits = model(candidates)
        wrong = (logits.argmax(1) != label).nonzero().flatten()
        if not len(wrong):
            return None
        top = logits[wrong[0]]
        return float(top[label] - torch.cat([top[:label], top[label + 1:]]).max())

    return relu_branch_and_bound(model, lower, upper, spec, deadline=time.perf_counter() + time_limit,
                                 falsify=falsify)


def _status(method: str, margin: Optional[float]) -> Status:
    if margin is not None and margin > 0:
        return Status.CERTIFIED
    if REGISTRY[method].complete and margin is not None and margin < 0:
        return Status.FALSIFIED
    return Status.UNKNOWN


def guard(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, certified: torch.Tensor,
          method: str, indices: Sequence[int], falsifier: Optional[Falsifier]) -> None:
    """Attack every certified sample at its eps; SoundnessError if any attack succeeds."""
    if falsifier is None or not bool(certified.any()):
        return
    where = certified.nonzero().flatten()
    x_adv = falsifier(x[where], y[where], eps[where])
    with torch.no_grad():
        broken = model(x_adv).argmax(1) != y[where]
    if bool(broken.any()):
        first = int(where[broken.nonzero().flatten()[0]])
        raise SoundnessError(f"sample {indices[first]}: method {method} certified eps {float(eps[first]):.6g}, "
                             f"but an attack found a misclassified point in that ball; this is a bound-engine bug, "
                             f"not a result")


def check_supported(model: nn.Module, x: torch.Tensor, method: str, norm: float, options: VerifyOptions) -> None:
    """Raise UnsupportedModelError (with the reason) when ``method`` cannot run on this model and norm."""
    if REGISTRY[method].linf_only and norm != math.inf:
        raise UnsupportedModelError(f"{method} verifies the L-inf norm only")
    if REGISTRY[method].exact:
        check_milp_supported(model, x.shape[1:], norm, options.milp_max_relus)
    check_crown_size(model, x, method, options.crown_max_relus)


def unsupported_reason(model: nn.Module, x: torch.Tensor, method: str, norm: float,
                       options: VerifyOptions) -> Optional[str]:
    """Why ``method`` cannot run on this model and norm, or None when it can."""
    try:
        check_supported(model, x, method, norm, options)
        return None
    except UnsupportedModelError as error:
        return str(error)


def supported(model: nn.Module, x: torch.Tensor, method: str, norm: float, options: VerifyOptions) -> bool:
    return unsupported_reason(model, x, method, norm, options) is None


def verify_methods(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm="inf",
                   methods: Sequence[str], indices: Optional[Sequence[int]] = None,
                   falsifier: Optional[Falsifier] = None, options: VerifyOptions = VerifyOptions(),
                   progress: Optional[Callable[[int], None]] = None,
                   rounding: Optional[Dict[str, Dict[str, int]]] = None) -> List[SampleResult]:
    """Every method on every sample at ``eps``: certified (bound > 0), else unknown (falsified where a
    complete method's margin is < 0: milp's exact minimum, bab's counterexample). x: (B, ...) in [0, 1];
    y: (B,). ``rounding`` (optional) gets, per method, how many margins the float64 check ``rechecked`` and
    how many of those it ``rejected``."""
    norm = parse_norm(norm)
    indices = list(range(len(x))) if indices is None else list(indices)
    eps_t = torch.full((len(x),), float(eps), device=x.device, dtype=x.dtype)
    with torch.no_grad():
        prediction = model(x).argmax(1)
    results: List[SampleResult] = []
    for method in methods:
        check_supported(model, x, method, norm, options)
        began = time.perf_counter()
        margins = margins_by(model, x, y, eps_t, norm, method, options=options, progress=progress,
                             counts=None if rounding is None else rounding.setdefault(method, {}))
        seconds = (time.perf_counter() - began) / max(len(x), 1)
        certified = torch.tensor([m is not None and m > 0 for m in margins], device=x.device)
        guard(model, x, y, eps_t, certified, method, indices, falsifier)
        for i, margin in enumerate(margins):
            results.append(SampleResult(indices[i], int(y[i]), int(prediction[i]), method, _status(method, margin),
                                        margin, None, seconds))
    return results


def cascade(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm="inf",
            methods: Sequence[str] = CASCADE_ORDER, indices: Optional[Sequence[int]] = None,
            falsifier: Optional[Falsifier] = None, options: VerifyOptions = VerifyOptions(),
            progress: Optional[Callable[[int], None]] = None,
            rounding: Optional[Dict[str, Dict[str, int]]] = None) -> List[SampleResult]:
    """Cheap methods first, each on the samples still undecided; one final result per sample,
    whose ``method`` names what decided it ("clean" / "attack" for falsified, "-" for unknown).
    A method that cannot run here is skipped (not an error): milp unless the model is a small ReLU MLP,
    bab and milp for L2, crown / alpha-crown / bab beyond ``options.crown_max_relus`` ReLU neurons.
    ``rounding`` as in ``verify_methods``."""
    norm = parse_norm(norm)
    indices = list(range(len(x))) if indices is None else list(indices)
    eps_t = torch.full((len(x),), float(eps), device=x.device, dtype=x.dtype)
    with torch.no_grad():
        prediction = model(x).argmax(1)
    final: Dict[int, SampleResult] = {}
    for i in (prediction != y).nonzero().flatten().tolist():
        final[i] = SampleResult(indices[i], int(y[i]), int(prediction[i]), "clean", Status.FALSIFIED, None)
    undecided = [i for i in range(len(x)) if i not in final]
    if falsifier is not None and undecided and eps > 0:
        where = torch.tensor(undecided, device=x.device)
        with torch.no_grad():
            broken = model(falsifier(x[where], y[where], eps_t[where])).argmax(1) != y[where]
        for k in broken.nonzero().flatten().tolist():
            i = undecided[k]
            final[i] = SampleResult(indices[i], int(y[i]), int(prediction[i]), "attack", Status.FALSIFIED, None)
        undecided = [i for i in undecided if i not in final]
    for method in methods:
        if not undecided:
            break
        if not supported(model, x, method, norm, options):
            continue
        where = torch.tensor(undecided, device=x.device)
        began = time.perf_counter()
        margins = margins_by(model, x[where], y[where], eps_t[where], norm, method, options=options,
                             progress=progress, counts=None if rounding is None else rounding.setdefault(method, {}))
        seconds = (time.perf_counter() - began) / len(undecided)
        certified = torch.tensor([m is not None and m > 0 for m in margins], device=x.device)
        guard(model, x[where], y[where], eps_t[where], certified, method, [indices[i] for i in undecided], falsifier)
        for k, margin in enumerate(margins):
            status = _status(method, margin)
            if status is not Status.UNKNOWN:
                i = undecided[k]
                final[i] = SampleResult(indices[i], int(y[i]), int(prediction[i]), method, status, margin, None,
                                        seconds)
        undecided = [i for i in undecided if i not in final]
    for i in undecided:
        final[i] = SampleResult(indices[i], int(y[i]), int(prediction[i]), "-", Status.UNKNOWN)
    return [final[i] for i in range(len(x))]


def milp_radius(model: nn.Module, x: torch.Tensor, y: int, *, eps_max: float, steps: int, time_limit: float,
                max_relus: int = 2000) -> float:
    """Largest eps (to ``eps_max / 2**steps``) at which the exact MILP margin is positive. A solve
    that hits ``time_limit`` counts as not certified, so the result stays a sound lower bound.
    ``eps_max`` may be an attack radius: the exact radius is never above it."""
    from verifiers.milp import exact_margin
    lower, upper = 0.0, eps_max

    def positive(eps):
        result = exact_margin(model, x, y, eps, time_limit=time_limit, max_relus=max_relus)
        return result.optimal and result.margin > 0

    if eps_max <= 0 or not positive(0.0):
        return 0.0
    if positive(eps_max):
        return eps_max
    for _ in range(steps):
        middle = (lower + upper) / 2
        if positive(middle):
            lower = middle
        else:
            upper = middle
    return lower


def radii(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm="inf", methods: Sequence[str],
          eps_max: float = 0.5, steps: int = 12, eps_min: float = 0.0, indices: Optional[Sequence[int]] = None,
          falsifier: Optional[Falsifier] = None, options: VerifyOptions = VerifyOptions(),
          progress: Optional[Callable[[int], None]] = None,
          attack_upper: Optional[torch.Tensor] = None) -> List[SampleResult]:
    """Certified radius per sample and method, each attacked at its radius by the guard: for crown and
    alpha-crown on the tape engine a root search on the margin curve (``verifiers.radius.crown_radius``: within
    1% below the smallest eps a pass failed at); for the others a batched bisection (per-sample MILP
    bisection for milp), within ``eps_max / 2**steps`` below the bisection limit of the method.

    With a falsifier, every method bisects below each sample's attack radius (``attack_upper``, or
    computed here by ``attack_radius``): no sound radius exceeds it, so the bisection resolves finer
    and never bounds at an eps an attack already broke (the costliest probes of full CROWN)."""
    from verifiers.radius import crown_radius
    norm = parse_norm(norm)
    indices = list(range(len(x))) if indices is None else list(indices)
    with torch.no_grad():
        prediction = model(x).argmax(1)
    if attack_upper is None and falsifier is not None and len(x):
        attack_upper = attack_radius(model, x, y, falsifier, eps_max=eps_max, steps=steps)
    if attack_upper is None:
        upper, attacked = torch.full((len(x),), float(eps_max), device=x.device, dtype=x.dtype), None
    else:
        upper = attack_upper.to(device=x.device, dtype=x.dtype).clamp(max=float(eps_max))
        attacked = upper < float(eps_max)
    results: List[SampleResult] = []
    for method in methods:
        if method == "bab":
            raise BoundInputError("bab decides a property at one eps; it has no radius (use crown or milp)")
        check_supported(model, x, method, norm, options)
        began = time.perf_counter()
        if REGISTRY[method].exact:
            # the exact radius lies below any attack radius: bisect on [0, attack radius]
            values = []
            for i in range(len(x)):
                values.append(milp_radius(model, x[i], int(y[i]), eps_max=float(upper[i]), steps=steps,
                                          time_limit=options.milp_time_limit, max_relus=options.milp_max_relus))
                if progress is not None:
                    progress(1)
            radius = torch.tensor(values, device=x.device, dtype=x.dtype)
        elif REGISTRY[method].bound is not None and uses_tape(model, REGISTRY[method].bound):
            try:  # full CROWN: a root search on the margin curve, far fewer passes than bisection
                radius, _ = crown_radius(model, x, y, norm=norm, upper=upper, eps_min=eps_min,
                                         options=tape_options(REGISTRY[method].bound), progress=progress)
            except UnsupportedModelError:  # a graph the tape cannot trace: bisection on auto_LiRPA
                radius = _bisected(model, x, y, norm, method, upper, steps, eps_min, attacked, options.batch_size,
                                   progress)
        else:
            radius = _bisected(model, x, y, norm, method, upper, steps, eps_min, attacked, options.batch_size, progress)
        seconds = (time.perf_counter() - began) / max(len(x), 1)
        guard(model, x, y, radius, radius > 0, method, indices, falsifier)
        for i in range(len(x)):
            r = float(radius[i])
            results.append(SampleResult(indices[i], int(y[i]), int(prediction[i]), method,
                                        Status.CERTIFIED if r > 0 else Status.UNKNOWN, None, r, seconds))
    return results


def _bisected(model, x, y, norm, method, upper, steps, eps_min, attacked, batch_size, progress) -> torch.Tensor:
    """Radii (B,) by ``verifiers.radius.certified_radius``'s bisection, in batches the method can afford."""
    from verifiers.radius import certified_radius
    parts = []
    step = method_batch_size(model, x, method, batch_size)
    for start in range(0, len(x), step):
        part = slice(start, start + step)
        parts.append(certified_radius(model, x[part], y[part], norm=norm, method=method, eps_max=upper[part],
                                      steps=steps, eps_min=eps_min, attacked=None if attacked is None else attacked[part]))
        if progress is not None:
            progress(len(x[part]))
    return torch.cat(parts)


def attack_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, falsifier: Falsifier, *, eps_max: float,
                  steps: int) -> torch.Tensor:
    """(B,) the smallest eps (to ``eps_max / 2**steps``) at which ``falsifier`` found a misclassified
    point: an upper bound on each sample's true robust radius (0 if misclassified; eps_max if never)."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    lower = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    upper = torch.full((len(x),), float(eps_max), device=x.device, dtype=x.dtype)
    with torch.no_grad():
        broken_at_max = model(falsifier(x, y, upper)).argmax(1) != y
    active = correct & broken_at_max
    for _ in range(steps):
        if not bool(active.any()):
            break
        where = active.nonzero().flatten()
        middle = (lower[where] + upper[where]) / 2
        with torch.no_grad():
            broken = model(falsifier(x[where], y[where], middle)).argmax(1) != y[where]
        upper[where] = torch.where(broken, middle, upper[where])
        lower[where] = torch.where(broken, lower[where], middle)
    return torch.where(correct, upper, torch.zeros_like(upper))


def summarize(values: Sequence[float]) -> Dict[str, float]:
    values = list(values)
    if not values:
        return {"mean": float("nan"), "median": float("nan")}
    return {"mean": float(statistics.fmean(values)), "median": float(statistics.median(values))}
