"""Certified radius: the largest eps whose margin lower bound is positive, per sample."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from verifiers.bounds import BoundMethod, margin_lower_bound
from verifiers.errors import BoundInputError
from verifiers.rounding import RTOL, logit_scale


def certified_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: Union[float, str] = math.inf,
                     method: Union[str, BoundMethod] = "crown-ibp", eps_max: Union[float, torch.Tensor] = 1.0,
                     steps: int = 15, eps_min: float = 0.0,
                     attacked: Optional[torch.Tensor] = None, engine: str = "auto") -> torch.Tensor:
    """Per-sample certified radius by bisection on [0, eps_max], all samples at once.

    x: (B, ...) in [0, 1]; y: (B,). Returns (B,) radii in pixel units; each returned radius is one
    at which the margin lower bound was computed and found above float32 rounding (greater than
    ``verifiers.rounding``'s tolerance; 0 where even eps = 0 is not certified, e.g. a misclassified
    sample), so the result is sound even where bounds are not monotone in eps. (A probe whose margin
    is positive but within the tolerance counts as not certified: the bisection resolves the radius
    below it instead of paying for a float64 recheck.) After ``steps`` halvings the true bisection radius lies within
    ``eps_max / 2**steps`` above the returned value.

    eps_min > 0 bisects in log space on [eps_min, eps_max] (as CNN-Cert does), for networks whose
    radii span many orders of magnitude: 0 is returned where even eps_min is not certified, and the
    true bisection radius lies within a factor ``(eps_max / eps_min) ** (1 / 2**steps)`` above.
    Keep eps_min above the input's float resolution (about 1e-7 for float32 pixels in [0, 1]):
    below it the ball holds no representable point other than x, and a "radius" certifies rounding.

    eps_max may be a (B,) tensor, e.g. attack radii (no sound radius exceeds them, so bisecting below
    them loses nothing and resolves finer); ``attacked`` (B,) bool marks samples whose eps_max an attack
    already broke: no bound is computed there (it cannot certify), which saves the costliest probe.

    A model in training mode is bounded as the function of the whole batch it is (its batch norm takes
    the batch's statistics): every probe bounds all of x, at eps 0 on the rows it does not probe.
    engine: as in ``verifiers.bounds.compute_bounds`` (``lirpa``: auto_LiRPA's CROWN, as before the tape engine).
    """
    batch = x.shape[0]
    log = eps_min > 0
    # A training-mode network (batch norm with the batch's statistics) is a function of the whole batch:
    # bounding a subset of it bounds a different function. There every probe bounds the whole batch at
    # per-sample eps (rows not probed at eps 0) and reads the probed rows.
    whole_batch = model.training
    lower = torch.full((batch,), float(eps_min) if log else 0.0, device=x.device, dtype=x.dtype)
    upper = torch.as_tensor(eps_max, device=x.device, dtype=x.dtype).expand(batch).clone().clamp_min(float(eps_min))
    attacked = torch.zeros(batch, dtype=torch.bool, device=x.device) if attacked is None else attacked.to(x.device)
    with torch.no_grad():
        tolerance = RTOL * logit_scale(model, x)

        def certified(index: torch.Tensor, at) -> torch.Tensor:
            if whole_batch:
                eps = torch.zeros(batch, device=x.device, dtype=x.dtype)
                eps[index] = at
                margin = margin_lower_bound(model, x, y, eps, norm=norm, method=method, engine=engine)[index]
            else:
                margin = margin_lower_bound(model, x[index], y[index], at, norm=norm, method=method, engine=engine)
            return margin > tolerance[index]

        everyone = torch.arange(batch, device=x.device)
        certified_zero = certified(everyone, float(eps_min))
        at_max = torch.zeros(batch, dtype=torch.bool, device=x.device)
        probe = (certified_zero & ~attacked).nonzero().flatten()
        if len(probe):
            at_max[probe] = certified(probe, upper[probe])
        lower = torch.where(at_max, upper, lower)
        active = certified_zero & ~at_max
        for _ in range(steps):
            if not active.any():
                break
            index = active.nonzero().flatten()
            middle = (lower[index] * upper[index]).sqrt() if log else (lower[index] + upper[index]) / 2
            ok = certified(index, middle)
            lower[index] = torch.where(ok, middle, lower[index])
            upper[index] = torch.where(ok, upper[index], middle)
    return torch.where(certified_zero, lower, torch.zeros_like(lower))


# ---------------------------------------------------------------- full CROWN: a root search on the margin curve

@dataclass(frozen=True)
class RadiusSearch:
    """Settings of ``crown_radius``. relative_tolerance: stop when the certified radius is within this fraction
    of the smallest radius a probe failed at; max_probes: full-CROWN passes per sample at most; first_fraction:
    the first probe of the first sample, as a fraction of its upper limit (None: 1/64 in L-inf, 1/256 in other
    norms: on the cpu tables' networks the PGD radius is a median 7.2 times the CROWN radius in L-inf and 49
    times in L2, so both put the first probe below the root, where a pass costs least; later samples start at
    the median radius found so far: on a trained network CROWN radii vary far less between samples than attack
    radii);
    first_order: predict each next probe from the margin's first-order bound (one gradient) minus a fitted
    relaxation loss, instead of a quadratic through the probes (False: the quadratic only)."""
    relative_tolerance: float = 0.01
    max_probes: int = 10
    first_fraction: Optional[float] = None
    first_order: bool = True

    def __post_init__(self):
        fraction = self.first_fraction
        if not 0 < self.relative_tolerance < 1 or self.max_probes < 1 or not (fraction is None or 0 < fraction <= 1):
            raise BoundInputError("relative_tolerance and first_fraction must lie in (0, 1), max_probes >= 1")

    def first(self, norm) -> float:
        """The first probe's fraction of the upper limit in ``norm``."""
        if self.first_fraction is not None:
            return self.first_fraction
        return 1 / 64 if float(norm) == math.inf else 1 / 256


@dataclass
class RadiusTrace:
    """How one sample's radius was found: the probes (eps, margin bound minus the rounding tolerance), the
    bracket [certified, failed] and the seconds spent."""
    radius: float
    failed: float
    probes: List[Tuple[float, float]] = field(default_factory=list)
    probe_seconds: List[float] = field(default_factory=list)
    seconds: float = 0.0


def _first_order(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, spec: torch.Tensor, norm, tolerance: float,
                 rows: int = 16):
    """The margin's first-order bound as a function of eps: ``eps -> min over the ball of h(x) + J (x' - x)``
    minus the rounding tolerance, with J the input gradient at x of the ``rows`` margins smallest at x (one
    backward pass). CROWN's bound at eps lies below it by what the ReLU relaxation loses, which grows faster than
    eps: the root search models that loss instead of the whole curve. x: (1, ...); logits: (1, K), the model's at
    x; spec: (1, S, K). None where the model has no input gradient (the search then fits a quadratic)."""
    from verifiers.perturbation import Perturbation
    clean = (logits.unsqueeze(1) * spec.to(x.dtype)).sum(2)[0]  # (S,)
    spec = spec[:, clean.argsort()[:rows]].to(x.dtype)
    try:
        with torch.enable_grad():
            copies = x.expand(spec.shape[1], *x.shape[1:]).clone().requires_grad_(True)
            margins = (model(copies) * spec[0]).sum(1)
            gradient, = torch.autograd.grad(margins.sum(), copies)
    except RuntimeError:  # e.g. a model whose forward pass detaches its input
        return None
    A = gradient.detach().unsqueeze(0)  # (1, S', ...)
    bias = margins.detach().unsqueeze(0) - (A.flatten(2) * x.flatten(1).unsqueeze(1)).sum(2)
    ball = Perturbation.ball(norm, 1.0, x)

    def at(eps: float) -> float:
        return float(ball.minimum(A, bias, x, torch.tensor([eps], dtype=x.dtype, device=x.device)).min()) - tolerance
    return at


def _loss_model_root(points: List[Tuple[float, float]], low: float, high: float, first_order) -> Optional[float]:
    """A root of the margin curve predicted as ``first_order(eps) - k eps^p`` (the relaxation's loss as a power
    of eps, p from the two probes nearest the bracket, else 2), found by bisection on [low, high]; None where
    the probes do not fit that shape (a probe above the first-order bound)."""
    probes = sorted(points[1:], key=lambda point: point[0])
    below = [q for q in probes if q[1] > 0]
    above = [q for q in probes if q[1] <= 0]
    near = ([below[-1]] if below else []) + ([above[0]] if above else [])
    if not near:
        return None
    losses = [(eps, first_order(eps) - margin) for eps, margin in near]
    if any(loss <= 0 or eps <= 0 for eps, loss in losses):
        return None
    power = 2.0
    if len(losses) == 2 and losses[0][0] != losses[1][0]:
        (e1, r1), (e2, r2) = losses
        power = min(max(math.log(r2 / r1) / math.log(e2 / e1), 1.0), 4.0)
    eps_ref, loss_ref = losses[-1] if above else losses[0]
    k = loss_ref / eps_ref ** power
    curve = lambda eps: first_order(eps) - k * eps ** power
    if curve(high) > 0:
        return high
    if curve(low) <= 0:
        return low
    a, b = low, high
    for _ in range(50):
        middle = (a + b) / 2
        if curve(middle) > 0:
            a = middle
        else:
            b = middle
    return (a + b) / 2


def _quadratic_root(points: List[Tuple[float, float]], low: float, high: float) -> float:
    """A root of the margin curve h(eps) predicted from (eps, h) points (h(0) > 0 first): a quadratic through h(0)
    and the two probes nearest the bracket [low, high] (with one probe: h(0) - k eps^2, the concave shape CROWN's
    margins have), clipped to the bracket."""
    zero, probes = points[0], sorted(points[1:], key=lambda point: point[0])
    below = [q for q in probes if q[1] > 0]
    above = [q for q in probes if q[1] <= 0]
    near = ([below[-1]] if below else []) + ([above[0]] if above else [])
    if len(near) == 1:
        near = sorted(probes, key=lambda q: abs(q[1]))[:2]
    root = None
    if len(near) >= 2:
        (e0, h0), (e1, h1), (e2, h2) = zero, near[0], near[1]
        # Newton form of the interpolating quadratic, then its roots
        d1 = (h1 - h0) / (e1 - e0)
        d2 = ((h2 - h1) / (e2 - e1) - d1) / (e2 - e0)
        a, b, c = d2, d1 - d2 * (e0 + e1), h0 - d1 * e0 + d2 * e0 * e1
        if abs(a) > 1e-300:
            disc = b * b - 4 * a * c
            if disc >= 0:
                roots = [(-b + s * math.sqrt(disc)) / (2 * a) for s in (1, -1)]
                inside = [r for r in roots if low <= r <= high]
                root = inside[0] if inside else None
        elif b != 0:
            root = -c / b
    if root is None:
        (e0, h0), (e1, h1) = zero, sorted(probes, key=lambda q: abs(q[1]))[0]
        k = (h0 - h1) / (e1 * e1) if e1 > 0 else 0.0
        root = math.sqrt(h0 / k) if k > 0 else 2 * e1
    return min(max(root, low), high)


def crown_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: Union[float, str] = math.inf,
                 upper: Union[float, torch.Tensor] = 0.5, eps_min: float = 0.0, options=None,
                 search: RadiusSearch = RadiusSearch(),
                 progress=None) -> Tuple[torch.Tensor, List[RadiusTrace]]:
    """Per-sample certified radius by full CROWN (``verifiers.crown``), found by root search instead of bisection.

    x: (B, ...) in [0, 1]; y: (B,); upper: float or (B,) limits (e.g. attack radii: no sound radius exceeds
    them). Returns ``(radii (B,), traces)``. Each radius is an eps at which a full-CROWN pass certified the
    margin above float32 rounding (``verifiers.rounding``'s tolerance), or one read off the linear bound of a
    pass at a larger eps (the same bound holds on every smaller ball): sound whatever the search does. Each pass
    is a probe; the next probe is aimed at the root that ``_next_probe`` predicts from the probes nearest the
    bracket [largest certified, smallest failed] (see there). A probe below a failed one starts from that probe's
    ReLU bounds (they hold on its smaller ball: the neurons they prove stable need no back-substitution) and
    replays its per-layer decisions (letting the sampled gain decide anew made it skip back-substitution that
    mattered: its margins came out low near the root and the search crept down in 6-8 cheap probes). The search
    stops when the certified radius is within ``relative_tolerance`` of the failed one (or when the upper limit is
    certified, or after ``max_probes``). 0 where even eps_min is not certified.
    ``progress(1)`` is called after each sample."""
    import time
    from verifiers.bounds import margin_specification
    from verifiers.crown import CrownOptions, linear_bound
    from verifiers.perturbation import Perturbation
    from verifiers.rounding import logit_scale
    options = options or CrownOptions()
    batch = x.shape[0]
    limit = torch.as_tensor(upper, dtype=x.dtype, device=x.device).expand(batch).clone()
    with torch.no_grad():
        logits = model(x)
    tolerance = RTOL * logit_scale(model, x)
    classes = logits.shape[1]
    radii, traces, found = torch.zeros(batch, dtype=x.dtype, device=x.device), [], []
    for i in range(batch):
        began = time.perf_counter()
        xi, yi = x[i:i + 1], y[i:i + 1]
        spec = margin_specification(yi, classes).to(x.dtype)
        tol = float(tolerance[i])
        others = torch.cat([logits[i, :int(yi)], logits[i, int(yi) + 1:]])
        clean = float(logits[i, int(yi)] - others.max()) - tol
        high = float(limit[i])
        trace = RadiusTrace(0.0, high, [(0.0, clean)])
        if clean > 0 and high > 0:
            low = 0.0
            # a little above the radius expected: probes below a failed one replay its bounds and cost less
            probe = min(high, 1.05 * sorted(found)[len(found) // 2] if found else high * search.first(norm))
            failed = None  # (eps, ReLU bounds, plan) of the smallest failed probe
            first_order = _first_order(model, xi, logits[i:i + 1], spec, norm, tol) if search.first_order else None
            for _ in range(search.max_probes):
                replay = failed is not None and probe <= failed[0]
                bound = linear_bound(model, xi, Perturbation.ball(norm, probe, xi), spec, options=options,
                                     prior=failed[1] if replay else None, plan=failed[2] if replay else None)
                margin = float(bound.lower.min()) - tol
                trace.probes.append((probe, margin))
                trace.probe_seconds.append(time.perf_counter() - began - sum(trace.probe_seconds))
                if margin > 0:
                    low = max(low, probe)
                else:
                    high = probe
                    failed = (probe, bound.relu_bounds, bound.plan)
                    low = max(low, float(bound.largest_eps(torch.tensor([tol], dtype=x.dtype))[0]))
                if low >= (1 - search.relative_tolerance) * high or low >= float(limit[i]):
                    break
                probe = _next_probe(trace.probes, low, high, search.relative_tolerance, first_order)
            trace.radius, trace.failed = (low if low >= eps_min else 0.0), high
            if trace.radius > 0:
                found.append(trace.radius)
        trace.seconds = time.perf_counter() - began
        radii[i] = trace.radius
        traces.append(trace)
        if progress is not None:
            progress(1)
    return radii, traces


def _next_probe(probes: List[Tuple[float, float]], low: float, high: float, relative_tolerance: float,
                first_order=None) -> float:
    """The next eps to probe inside (low, high), aimed so that the bracket closes in as few probes as the predicted
    root allows: a closing probe where the root lies within the tolerance of an end of the bracket (just above
    ``low``, or just below ``high``: either answer there closes the bracket or moves it past the root); else just
    above the root (half the tolerance: a failure there leaves only the closing probe below it; before any probe
    failed and with one probe to predict from, twice the tolerance), kept off the bracket's ends (it shrinks by
    a tenth at least). Where a closing probe did not close, the geometric middle of the bracket."""
    root = _loss_model_root(probes, low, high, first_order) if first_order is not None else None
    if root is None:
        root = _quadratic_root(probes, low, high)
    if all(margin > 0 for _, margin in probes):
        above = relative_tolerance / 2 if first_order is not None and len(probes) > 2 else 2 * relative_tolerance
        return min(root * (1 + above), high)
    step = 1 - 0.9 * relative_tolerance
    # a closing probe that did not close and left the margin about where the probe before it had it (a cliff the
    # model misjudges): halve the bracket in log space instead of creeping on by the tolerance a probe. Where the
    # margin did shrink towards 0 (a smooth curve whose root lies just past the closing probe), keep closing.
    if _stalled(probes, low, True, step) or _stalled(probes, high, False, step):
        return math.sqrt(max(low, high * 1e-3) * high)
    if root >= high * step:
        return high * step
    if low > 0 and root <= low / step:
        return low / step
    width = high - low
    target = root * (1 + relative_tolerance / 2) if first_order is not None else root
    return min(max(target, low + 0.1 * width), high - 0.1 * width)


def _stalled(probes: List[Tuple[float, float]], end: float, certified: bool, step: float) -> bool:
    """Whether the probe at ``end`` of the bracket (the largest certified eps, or the smallest failed) crept past
    another probe on the same side within two tolerance steps without halving that probe's margin (its distance
    from 0): a closing probe that did not close, on a curve the root model misjudges."""
    side = [(eps, margin) for eps, margin in probes[1:] if (margin > 0) == certified]
    at = [abs(margin) for eps, margin in side if eps == end]
    near = [abs(margin) for eps, margin in side if eps != end and end * step * step <= eps <= end / (step * step)]
    return bool(at and near) and at[0] > 0.5 * min(near)
