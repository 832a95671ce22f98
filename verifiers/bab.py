"""Branch and bound on bound propagation: complete verification of linear output properties.

The question: over an input box, can the network's outputs y satisfy some *clause* (a conjunction of rows
``A_r y <= b_r``)? A clause is impossible on a set of inputs when some row's lower bound of ``A_r y - b_r``
there is positive; the property holds (``unsat``) when every clause is impossible everywhere.

ReLU splitting (:func:`relu_branch_and_bound`): the box's full-CROWN tape (``verifiers.crown``) is computed
once. A subdomain fixes the sign of some ReLU inputs (``z >= 0`` or ``z <= 0``). It is bounded by
back-substituting the rows with the split neurons relaxed exactly (identity or zero) and every split
constraint added to the objective through a Lagrange multiplier ``beta >= 0`` (beta-CROWN: for inputs of the
subdomain ``f(x) >= f(x) - beta * s * z(x)``, and the right side is bounded over the whole box), the lower
slopes ``alpha`` of the unstable ReLUs and the multipliers optimised by projected Adam, many subdomains at once
(the batch axis). Any alpha in [0, 1] and beta >= 0 gives a sound bound, so the optimiser only decides how
tight. Intermediate bounds are those of the box (valid in every subdomain), alpha-optimised once before the root. Subdomains whose every clause is
impossible are dropped; the others are split on the ReLU with the best branching score, worst bound first.
Every bounded subdomain's minimiser of its worst linear bound is handed to ``falsify`` (with the promising ones
used as attack starts), so a counterexample found on the way ends the search (``sat``).

Input splitting (:func:`input_branch_and_bound`), for networks with few inputs: subdomains are sub-boxes,
bounded by full CROWN and halved along the input with the largest width times coefficient.

Both stop at the deadline with ``timeout`` (never later than one batch's bounding step, checked between
optimiser steps too). Soundness is shown by tests/verifiers/test_bab.py (MILP agrees on every verdict, points
inside verified subdomains, planted counterexamples are found).
"""
from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from verifiers.crown import CrownOptions, Tape, _backward_bounds, bounded_tape, neuron_spec, projected_step
from verifiers.errors import BoundInputError
from verifiers.interval import ReluRelaxation, ancestors, back_substitute
from verifiers.perturbation import Perturbation

# (ReLU layer, flat neuron index, +1 for z >= 0 / -1 for z <= 0)
Split = Tuple[int, int, int]
# candidate inputs (B, ...) -> a counterexample (any object the caller understands) or None
Falsify = Callable[[torch.Tensor], Optional[object]]

BRANCHING = ("babsr", "width")


@dataclass(frozen=True)
class BabOptions:
    """batch: subdomains split per step (each gives two children, bounded together); iterations / lr_*: Adam
    on alpha and beta per batch; root_iterations: on alpha at the root; branching: ``babsr`` (the ReLU whose
    upper relaxation costs the worst row most, from the coefficients back-substitution reaches it with) or
    ``width`` (the widest unstable pre-activation interval); batch_bytes: the memory one batch's coefficients
    may take (large networks bound smaller batches); input_dims: input splitting below this many inputs;
    refine: recompute the bounds of ReLUs below a split in each batch (CROWN through the split-aware
    relaxations), so splits tighten the layers after them and not only the output (off by default: after
    the intermediate optimisation it slowed the search more than it tightened, on mnistfc 256x2 and 256x4);
    intermediate_iterations / lr_intermediate: alpha-CROWN on every ReLU's input bounds before the root
    (:func:`tighten_relu_bounds`; 0: CROWN's bounds as they are)."""
    batch: int = 256
    iterations: int = 12
    root_iterations: int = 40
    lr_alpha: float = 0.1
    lr_beta: float = 0.05
    branching: str = "babsr"
    batch_bytes: int = 2 ** 29
    input_dims: int = 16
    attack_starts: int = 16
    refine: bool = False
    intermediate_iterations: int = 20
    lr_intermediate: float = 0.1

    def __post_init__(self):
        if self.batch < 1 or min(self.iterations, self.root_iterations, self.attack_starts,
                                 self.intermediate_iterations) < 0:
            raise BoundInputError("batch must be >= 1; iterations, root_iterations, intermediate_iterations and "
                                  "attack_starts >= 0")
        if self.branching not in BRANCHING:
            raise BoundInputError(f"unknown branching {self.branching!r}; known: {', '.join(BRANCHING)}")


@dataclass
class BabResult:
    """verdict: ``unsat``, ``sat`` or ``timeout``; domains: subdomains bounded; depth: the most splits on
    one path; root_verified: decided by the root bound alone; counterexample: from ``falsify``, for sat."""
    verdict: str
    domains: int = 0
    depth: int = 0
    seconds: float = 0.0
    root_verified: bool = False
    counterexample: Optional[object] = None
    open_domains: int = 0
    proven_margin: Optional[float] = None  # unsat: the smallest worst-row margin over the verified leaves
    log: List[str] = field(default_factory=list)


@dataclass
class Domain:
    """A subdomain: its splits and, from its parent's bounding, the optimised lower slopes (per ReLU layer,
    (S, unstable neurons of the box)) and split multipliers ((S, splits), in split order) to start from."""
    splits: Tuple[Split, ...] = ()
    alphas: Optional[List[torch.Tensor]] = None
    betas: Optional[torch.Tensor] = None


@dataclass
class Specification:
    """Rows ``C y - b`` (C: (S, K), b: (S,)) grouped in clauses (each a list of row indices): a clause is
    impossible where one of its rows is positive. ``tolerance`` (S,): a row counts as positive only above it
    (float32 rounding, as ``verifiers.rounding`` measures it)."""
    C: torch.Tensor
    b: torch.Tensor
    clauses: List[List[int]]
    tolerance: torch.Tensor

    def impossible(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, S) row bounds -> (B, clauses) whether each clause is impossible."""
        positive = rows > self.tolerance
        return torch.stack([positive[:, clause].any(1) for clause in self.clauses], 1)

    def worst(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B,): the lowest over clauses of the clause's best row margin (> 0: every clause impossible)."""
        margin = rows - self.tolerance
        return torch.stack([margin[:, clause].max(1).values for clause in self.clauses], 1).min(1).values


# ---------------------------------------------------------------- bounding a batch of ReLU-split subdomains

def _split_tensors(tape: Tape, domains: Sequence[Domain]) -> List[torch.Tensor]:
    """Per ReLU layer, (B, N) int8: +1 / -1 where a domain fixes the neuron's sign, else 0."""
    batch = len(domains)
    out = [torch.zeros(batch, n.data["lower"][0].numel(), dtype=torch.int8, device=tape.x.device) for n in tape.relus]
    for i, domain in enumerate(domains):
        for layer, index, sign in domain.splits:
            out[layer][i, index] = sign
    return out


def _root_positions(tape: Tape) -> List[torch.Tensor]:
    """Per ReLU layer, (N,): each neuron's position among the box's unstable neurons (-1 if stable there);
    cached on the tape. A subdomain's unstable neurons are among them (its bounds only shrink)."""
    cached = getattr(tape, "_root_positions", None)
    if cached is None:
        cached = []
        for node in tape.relus:
            lower, upper = node.data["lower"].reshape(-1), node.data["upper"].reshape(-1)
            index = ((lower < 0) & (upper > 0)).nonzero().flatten()
            position = torch.full_like(lower, -1, dtype=torch.long)
            position[index] = torch.arange(len(index), device=index.device)
            cached.append(position)
        tape._root_positions = cached
    return cached


def tighten_relu_bounds(tape: Tape, steps: int, lr: float, deadline: float, row_bytes: int = 2 ** 28) -> int:
    """alpha-CROWN on the tape's pre-activation bounds: each ReLU layer after the first, in order, its
    unstable neurons' lower and upper bounds back-substituted with the lower slopes of the ReLUs before it
    optimised per bound (projected Adam, ``steps`` steps; any slope in [0, 1] is sound, each bound keeps its
    best value and is intersected with the one the tape had), so each layer is relaxed from the tightened
    bounds of the layers before it. Returns how many neurons became stable. Stops at the deadline with what
    it has (every bound written is sound)."""
    x, box = tape.x, tape.perturbation
    widest = max(math.prod(n.shape) for n in tape.nodes)
    stabilised = 0
    for k, node in enumerate(tape.relus):
        parent = node.parents[0]
        # the ReLUs before it that it depends on (a cell's parallel branches: not every earlier one)
        sources = ancestors(parent)
        earlier = [e for e in tape.relus[:k] if e in sources]
        if not earlier or time.perf_counter() > deadline:
            continue
        flat_l = node.data["lower"].reshape(1, -1).clone()
        flat_u = node.data["upper"].reshape(1, -1).clone()
        index = ((flat_l < 0) & (flat_u > 0))[0].nonzero().flatten()
        if not len(index):
            continue
        bases = [ReluRelaxation.from_bounds(e.data["lower"], e.data["upper"]) for e in earlier]
        chunk = max(1, row_bytes // (2 * widest * x.element_size() * 4))
        for start in range(0, len(index), chunk):
            part = index[start:start + chunk]
            count = len(part)
            spec = neuron_spec(part, parent.shape, 1, x)
            opens, alphas = [], []
            for e, base in zip(earlier, bases):
                l_u = e.data["lower"].reshape(1, -1)[:, base.unstable]
                u_u = e.data["upper"].reshape(1, -1)[:, base.unstable]
                opens.append(((l_u < 0) & (u_u > 0)).unsqueeze(1))
                alphas.append(base.lower_slope.unsqueeze(1).expand(1, 2 * count, -1).clone().requires_grad_(True))
            trained = [a for a in alphas if a.numel()]
            optimiser = torch.optim.Adam(trained, lr=lr) if trained else None
            best = torch.full((1, 2 * count), -math.inf, device=x.device, dtype=x.dtype)
            for step in range(steps + 1):
                if step and time.perf_counter() > deadline:
                    break
                for e, base, open_, alpha in zip(earlier, bases, opens, alphas):
                    slope = torch.where(open_, alpha, base.lower_slope.unsqueeze(1))
                    e.data["relaxation"] = ReluRelaxation(base.passes, base.unstable, slope, base.upper_slope,
                                                          base.upper_intercept)
                with torch.enable_grad():
                    A, bias, _ = back_substitute(parent, spec)
                    bound = box.minimum(A, bias, x)
                    if step < steps and optimiser is not None:
                        gradients = torch.autograd.grad(-bound.sum(), trained)
                best = torch.maximum(best, bound.detach())
                if step < steps and optimiser is not None:
                    projected_step(optimiser, trained, gradients, [(0.0, 1.0)] * len(trained))
            flat_l[:, part] = torch.maximum(flat_l[:, part], best[:, :count])
            flat_u[:, part] = torch.minimum(flat_u[:, part], -best[:, count:])
        for e, base in zip(earlier, bases):
            e.data["relaxation"] = base
        before = int(index.numel())
        lower, upper = flat_l.view_as(node.data["lower"]), flat_u.view_as(node.data["upper"])
        node.data.update(lower=lower, upper=upper, relaxation=ReluRelaxation.from_bounds(lower, upper))
        stabilised += before - int(((flat_l < 0) & (flat_u > 0)).sum())
    if hasattr(tape, "_root_positions"):
        del tape._root_positions
    return stabilised


@dataclass
class _Bounded:
    rows: torch.Tensor                      # (B, S) best lower bounds of C y - b
    A: torch.Tensor                         # (B, S, *input): the linear bounds of the last step
    bias: torch.Tensor
    scores: List[torch.Tensor]              # per layer (B, N) branching scores (-inf where not splittable)
    alphas: List[torch.Tensor]              # per layer (B, S, unstable neurons of the box): the slopes reached
    betas: List[torch.Tensor]               # per domain (S, its splits): the multipliers reached


def _bound_domains(tape: Tape, spec: Specification, domains: Sequence[Domain], options: BabOptions,
                   iterations: int, deadline: float) -> Optional[_Bounded]:
    """beta-CROWN bounds of the subdomains (None when the deadline passed during the optimisation), the slopes
    and multipliers starting where each domain's parent left them."""
    positions = _root_positions(tape)
    batch = len(domains)
    rows = spec.C.shape[0]
    device, dtype = tape.x.device, tape.x.dtype
    splits = _split_tensors(tape, domains)
    lower_box, upper_box = tape.perturbation.box
    box = Perturbation.input_box(lower_box.expand(batch, *lower_box.shape[1:]),
                                 upper_box.expand(batch, *upper_box.shape[1:]))
    x = tape.x.expand(batch, *tape.x.shape[1:])
    layers = []  # per ReLU: (node, parent, relaxation, open mask (B, 1, U), alpha, beta, split index, split, bounds)
    split_before = False
    for node, split in zip(tape.relus, splits):
        lower0, upper0 = node.data["lower"].reshape(1, -1), node.data["upper"].reshape(1, -1)
        lower, upper = lower0.expand(batch, -1), upper0.expand(batch, -1)
        if split_before and options.refine:
            # bounds below a split: CROWN through the earlier layers' split-aware relaxations (set below)
            index = ((lower < 0) & (upper > 0) & (split == 0)).any(0).nonzero().flatten()
            if len(index):
                refined_l, refined_u = _backward_bounds(node.parents[0], index, box, x, batch, 128)
                lower, upper = lower.clone(), upper.clone()
                lower[:, index] = torch.maximum(lower[:, index], refined_l)
                upper[:, index] = torch.minimum(upper[:, index], refined_u)
        lower = torch.where(split > 0, lower.clamp_min(0), lower)
        upper = torch.where(split < 0, upper.clamp_max(0), upper)
        split_before = split_before or bool((split != 0).any())
        shape = node.data["lower"].shape[1:]
        base = ReluRelaxation.from_bounds(lower.view(batch, *shape), upper.view(batch, *shape))
        node.data["relaxation"] = base  # what the refinement of later layers back-substitutes through
        l_u, u_u = lower[:, base.unstable], upper[:, base.unstable]
        open_ = ((l_u < 0) & (u_u > 0)).unsqueeze(1)
        layer_number = len(layers)
        where = positions[layer_number][base.unstable]
        alpha = base.lower_slope.unsqueeze(1).expand(batch, rows, -1).clone()
        split_index = (split != 0).any(0).nonzero().flatten()
        column = torch.full((split.shape[1],), -1, dtype=torch.long, device=device)
        column[split_index] = torch.arange(len(split_index), device=device)
        beta = torch.zeros(batch, rows, len(split_index), device=device, dtype=dtype)
        for i, domain in enumerate(domains):
            if domain.alphas is not None:
                alpha[i] = domain.alphas[layer_number][:, where]
            if domain.betas is not None:
                for k, (layer, index, _) in enumerate(domain.splits[:domain.betas.shape[1]]):
                    if layer == layer_number:
                        beta[i, :, column[index]] = domain.betas[:, k]
        alpha.requires_grad_(True)
        beta.requires_grad_(True)
        layers.append((node, node.parents[0], base, open_, alpha, beta, split_index, split, (lower, upper)))
    alphas = [layer[4] for layer in layers if layer[4].numel()]
    betas = [layer[5] for layer in layers if layer[5].numel()]
    optimiser = torch.optim.Adam([{"params": alphas, "lr": options.lr_alpha}, {"params": betas, "lr": options.lr_beta}])
    # alphas stay in [0, 1], betas in [0, inf): the sets where every bound is sound
    parameters, ranges = alphas + betas, [(0.0, 1.0)] * len(alphas) + [(0.0, None)] * len(betas)
    C = spec.C.to(dtype).unsqueeze(0).expand(batch, -1, -1)
    best = torch.full((batch, rows), -math.inf, device=device, dtype=dtype)
    best_A = best_bias = None
    for node, *_ in layers:
        node.data["captured"] = None
    for step in range(iterations + 1):
        if step and time.perf_counter() > deadline:
            return None
        for node, parent, base, open_, alpha, beta, split_index, split, _ in layers:
            # the parameters as they are (projected after each step): torch.clamp has no gradient at the bounds,
            # where every alpha and beta starts
            slope = torch.where(open_, alpha, base.lower_slope.unsqueeze(1))
            node.data["relaxation"] = ReluRelaxation(base.passes, base.unstable, slope, base.upper_slope,
                                                     base.upper_intercept)
            if len(split_index):
                sign = split[:, split_index].to(dtype).unsqueeze(1)  # (B, 1, J)
                extra = torch.zeros(batch, rows, split.shape[1], device=device, dtype=dtype)
                extra = extra.index_copy(2, split_index, -beta * sign)
                parent.data["extra_coefficients"] = extra.view(batch, rows, *parent.shape)
            else:
                parent.data.pop("extra_coefficients", None)
        with torch.enable_grad():
            A, bias, _ = back_substitute(tape.output, C)
            bound = box.minimum(A, bias, x) - spec.b.to(dtype)
            if step < iterations and parameters:
                loss = -(bound - spec.tolerance).clamp(max=0).sum() - 1e-3 * bound.sum()
                gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
        better = bound.detach() > best
        best = torch.where(better, bound.detach(), best)
        if best_A is None:
            best_A, best_bias = A.detach(), bias.detach()
        else:
            mask = better.view(*better.shape, *([1] * (A.dim() - 2)))
            best_A, best_bias = torch.where(mask, A.detach(), best_A), torch.where(better, bias.detach(), best_bias)
        if step < iterations and parameters:
            projected_step(optimiser, parameters, gradients, ranges)
    scores = _scores(layers, best, spec, options)
    alphas, betas = [], []
    for number, (node, parent, base, open_, alpha, beta, split_index, split, _) in enumerate(layers):
        parent.data.pop("extra_coefficients", None)
        node.data.pop("captured", None)
        full = torch.zeros(batch, rows, int((positions[number] >= 0).sum()), device=device, dtype=dtype)
        full[:, :, positions[number][base.unstable]] = alpha.detach()
        alphas.append(full)
    columns = [{int(j): c for c, j in enumerate(layer[6].tolist())} for layer in layers]
    for i, domain in enumerate(domains):
        values = [layers[layer][5][i, :, columns[layer][index]].detach() for layer, index, _ in domain.splits]
        betas.append(torch.stack(values, 1) if values else torch.zeros(rows, 0, device=device, dtype=dtype))
    return _Bounded(best, best_A, best_bias, scores, alphas, betas)


def _scores(layers, rows: torch.Tensor, spec: Specification, options: BabOptions) -> List[torch.Tensor]:
    """Per layer, (B, N) branching scores of the neurons still unstable in each domain (-inf elsewhere)."""
    worst = (rows - spec.tolerance).argmin(1)  # the row each domain needs most
    out = []
    for node, parent, base, open_, alpha, beta, split_index, split, (lower, upper) in layers:
        batch, count = split.shape
        score = torch.full((batch, count), -math.inf, device=rows.device, dtype=rows.dtype)
        index = base.unstable
        if not len(index):
            out.append(score)
            continue
        l_u, u_u = lower[:, index], upper[:, index]
        is_open = open_[:, 0, :] & (split[:, index] == 0)
        if options.branching == "width":
            value = (u_u - l_u).expand(batch, -1)
        else:
            captured = node.data.get("captured")
            coefficient = captured.reshape(batch, captured.shape[1], -1)[torch.arange(batch), worst][:, index]
            intercept = base.upper_intercept  # -l u / (u - l) on the unstable neurons
            value = (-coefficient.clamp(max=0)) * intercept + 1e-6 * (u_u - l_u)
        score[:, index] = torch.where(is_open, value, torch.full_like(value, -math.inf))
        out.append(score)
    return out


def _choose(scores: List[torch.Tensor]) -> List[Optional[Tuple[int, int]]]:
    """Per domain, the (layer, neuron) with the highest score (None where nothing is left to split)."""
    best_value = torch.stack([s.max(1).values for s in scores], 1)  # (B, layers)
    best_layer = best_value.argmax(1)
    choices = []
    for i in range(best_value.shape[0]):
        layer = int(best_layer[i])
        if not math.isfinite(float(best_value[i, layer])):
            choices.append(None)
            continue
        choices.append((layer, int(scores[layer][i].argmax())))
    return choices


def _minimisers(result: _Bounded, spec: Specification, box: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per domain, the corner of the box that minimises its worst row's linear bound (B, ...)."""
    worst = (result.rows - spec.tolerance).argmin(1)
    A = result.A[torch.arange(len(worst)), worst]  # (B, *input)
    lower, upper = box
    return torch.where(A > 0, lower.expand_as(A), upper.expand_as(A))


def relu_branch_and_bound(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, spec: Specification, *,
                          deadline: float, options: BabOptions = BabOptions(), falsify: Optional[Falsify] = None,
                          tape: Optional[Tape] = None, log: Optional[Callable[[str], None]] = None) -> BabResult:
    """Decide whether some input in the box ``lower <= x <= upper`` (each (1, ...)) satisfies a clause of
    ``spec``: ``unsat`` (none does), ``sat`` (``falsify`` confirmed one) or ``timeout``."""
    began = time.perf_counter()
    result = BabResult("timeout")

    def note(line: str) -> None:
        result.log.append(line)
        if log is not None:
            log(line)

    def finish(verdict: str, counterexample=None) -> BabResult:
        result.verdict, result.counterexample = verdict, counterexample
        result.seconds = time.perf_counter() - began
        return result

    if tape is None:
        tape = bounded_tape(model, (lower + upper) / 2, Perturbation.input_box(lower, upper),
                            options=CrownOptions(backsubstitution="all"))
    if options.intermediate_iterations:
        stable = tighten_relu_bounds(tape, options.intermediate_iterations, options.lr_intermediate, deadline)
        note(f"intermediate bounds: {stable} more ReLUs stable ({time.perf_counter() - began:.2f} s)")
    root = _bound_domains(tape, spec, [Domain()], options, options.root_iterations, deadline)
    if root is None:
        return finish("timeout")
    result.domains = 1
    if falsify is not None:
        found = falsify(_minimisers(root, spec, (lower, upper)))
        if found is not None:
            return finish("sat", found)
    worst = float(spec.worst(root.rows)[0])
    note(f"root: worst margin {worst:.4g} ({time.perf_counter() - began:.2f} s)")
    if worst > 0:
        result.root_verified, result.proven_margin = True, worst
        return finish("unsat")
    proven = math.inf
    counter = itertools.count()
    heap: List[Tuple[float, int, Domain]] = []
    choice = _choose(root.scores)[0]
    if choice is None:  # every ReLU already fixed or stable, and still not proven: no split can help
        return finish("timeout")
    _push_children(heap, counter, Domain(), choice, worst, root, 0)
    batch_size = _batch_size(tape, spec, options)
    steps = 0
    while heap:
        if time.perf_counter() > deadline:
            break
        parents = [heapq.heappop(heap) for _ in range(min(batch_size, len(heap)))]
        domains = [domain for _, _, domain in parents]
        bounded = _bound_domains(tape, spec, domains, options, options.iterations, deadline)
        if bounded is None:
            break
        result.domains += len(domains)
        result.depth = max(result.depth, max(len(d.splits) for d in domains))
        margins = spec.worst(bounded.rows)
        if falsify is not None:
            starts = _minimisers(bounded, spec, (lower, upper))
            order = margins.argsort()[:max(options.attack_starts, 1)]
            found = falsify(starts[order])
            if found is not None:
                return finish("sat", found)
        choices = _choose(bounded.scores)
        for i, domain in enumerate(domains):
            margin = float(margins[i])
            if margin > 0:
                proven = min(proven, margin)
                continue
            if choices[i] is None:  # nothing left to split in a domain not proven: undecidable by splitting
                note(f"a subdomain with every ReLU fixed stays unproven (margin {margin:.3g})")
                result.open_domains = len(heap) + 1
                return finish("timeout")
            _push_children(heap, counter, domain, choices[i], margin, bounded, i)
        steps += 1
        if steps % 20 == 0:
            verified = float((margins > 0).float().mean())
            note(f"{result.domains} domains bounded, {len(heap)} open (worst {heap[0][0] if heap else 0:.3g}), "
                 f"{verified:.0%} of the last batch verified, depth {result.depth} ({time.perf_counter() - began:.1f} s)")
    result.open_domains = len(heap)
    if heap:
        return finish("timeout")
    note(f"every subdomain verified: {result.domains} bounded, depth {result.depth}")
    result.proven_margin = proven
    return finish("unsat")


def _push_children(heap, counter, domain: Domain, choice: Tuple[int, int], margin: float, bounded: _Bounded,
                   position: int) -> None:
    """The two children of a bounded domain split on ``choice``, starting from the slopes and multipliers it
    reached (the new split's multiplier at 0)."""
    layer, index = choice
    alphas = [a[position] for a in bounded.alphas]
    betas = bounded.betas[position]
    for sign in (1, -1):
        heapq.heappush(heap, (margin, next(counter), Domain(domain.splits + ((layer, index, sign),), alphas, betas)))


def _batch_size(tape: Tape, spec: Specification, options: BabOptions) -> int:
    """Subdomains per step: two children each; the coefficients of the widest node must fit batch_bytes."""
    widest = max(math.prod(n.shape) for n in tape.nodes)
    per_domain = 2 * spec.C.shape[0] * widest * tape.x.element_size() * 4
    return max(1, min(options.batch, options.batch_bytes // max(per_domain, 1)))


# ---------------------------------------------------------------- input splitting

def input_branch_and_bound(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, spec: Specification, *,
                           deadline: float, options: BabOptions = BabOptions(), falsify: Optional[Falsify] = None,
                           log: Optional[Callable[[str], None]] = None) -> BabResult:
    """As :func:`relu_branch_and_bound`, splitting the input box instead (for networks with few inputs):
    each sub-box is bounded by full CROWN; unproven ones are halved along the input whose width times the
    worst row's coefficient is largest."""
    began = time.perf_counter()
    result = BabResult("timeout")
    boxes = [(lower, upper)]
    crown = CrownOptions(backsubstitution="all")
    while boxes:
        if time.perf_counter() > deadline:
            result.open_domains = len(boxes)
            result.seconds = time.perf_counter() - began
            return result
        batch, boxes = boxes[:options.batch], boxes[options.batch:]
        lo = torch.cat([b[0] for b in batch])
        hi = torch.cat([b[1] for b in batch])
        tape = bounded_tape(model, (lo + hi) / 2, Perturbation.input_box(lo, hi), options=crown)
        C = spec.C.to(lo.dtype).unsqueeze(0).expand(len(batch), -1, -1)
        with torch.no_grad():
            A, bias, _ = back_substitute(tape.output, C)
            rows = tape.perturbation.minimum(A, bias, tape.x) - spec.b.to(lo.dtype)
        result.domains += len(batch)
        worst_row = (rows - spec.tolerance).argmin(1)
        coefficient = A[torch.arange(len(batch)), worst_row]
        if falsify is not None:
            found = falsify(torch.where(coefficient > 0, lo, hi))
            if found is not None:
                result.verdict, result.counterexample = "sat", found
                result.seconds = time.perf_counter() - began
                return result
        margins = spec.worst(rows)
        for i in range(len(batch)):
            if float(margins[i]) > 0:
                continue
            width = (hi[i] - lo[i]).flatten()
            dim = int((width * coefficient[i].flatten().abs()).argmax())
            if width[dim] <= 0:
                result.open_domains = len(boxes) + 1
                result.seconds = time.perf_counter() - began
                return result
            middle = (lo[i].flatten()[dim] + hi[i].flatten()[dim]) / 2
            left_hi, right_lo = hi[i:i + 1].clone(), lo[i:i + 1].clone()
            left_hi.view(-1)[dim] = middle
            right_lo.view(-1)[dim] = middle
            boxes += [(lo[i:i + 1], left_hi), (right_lo, hi[i:i + 1])]
    result.verdict = "unsat"
    result.seconds = time.perf_counter() - began
    if log is not None:
        log(f"every sub-box verified: {result.domains} bounded")
    return result
