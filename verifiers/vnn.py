"""Decide a VNNLIB property on a network: ``sat`` (with a checked counterexample), ``unsat``, ``unknown``
or ``timeout``, in the VNN-COMP result format.

The cascade: an attack (PGD on the violation of each output clause, from the box centre and random
starts), then each bound method (IBP, CROWN-IBP, CROWN, alpha-CROWN) on the clauses not yet proven
infeasible, then MILP where the network is a small ReLU chain. A clause ``A y <= b`` is infeasible when
a lower bound of some row ``A_j y - b_j`` over the box is > 0; the property is unsat when every clause is.
A counterexample is reported only after a plain forward pass (and ``confirm``, e.g. onnxruntime on the
original file) shows that it lies in the box and satisfies a clause. The soundness guard: after unsat,
a second, stronger attack runs (twice the restarts, at least 20, other random starts); if it finds a counterexample the bound engine is wrong and
``SoundnessError`` is raised instead of a verdict.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from verifiers.bab import BabOptions
from verifiers.errors import UnsupportedModelError
from verifiers.rounding import RTOL, certified_slack
from verifiers.verify import METHODS, REGISTRY, SoundnessError
from verifiers.vnnlib import Property

VERDICTS = ("sat", "unsat", "unknown", "timeout")
EXIT_MARGIN = 3.0  # seconds kept back from the timeout for writing the result and exiting
BOUND_METHODS = tuple(name for name in METHODS if REGISTRY[name].bound is not None)
Confirm = Callable[[np.ndarray], Optional[np.ndarray]]  # x (flat) -> outputs (flat) of a second runtime


@dataclass
class VnnResult:
    """verdict: one of VERDICTS; decided_by: the stage that decided it; counterexample: (x, y)
    flattened, for sat; stages: one line per stage run."""
    verdict: str
    decided_by: str
    seconds: float
    counterexample: Optional[Tuple[np.ndarray, np.ndarray]] = None
    stages: List[str] = field(default_factory=list)

    def result_text(self) -> str:
        """The VNN-COMP result file: the verdict, and for sat the assignment ``((X_0 v) ... (Y_0 v))``."""
        if self.verdict != "sat" or self.counterexample is None:
            return self.verdict + "\n"
        x, y = self.counterexample
        pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x)] + [f"(Y_{i} {float(v)!r})" for i, v in enumerate(y)]
        return "sat\n(" + "\n ".join(pairs) + ")\n"


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.zeros(())).device


def _flat_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).reshape(len(x), -1)


def _confirmed(model: nn.Module, prop: Property, x: np.ndarray, shape: Tuple[int, ...],
               confirm: Optional[Confirm]) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(x, y) when x lies in the box and both the model and ``confirm`` put y in the output region."""
    x = np.clip(x.astype(np.float32), prop.lower.astype(np.float32), prop.upper.astype(np.float32))
    slack = 1e-7 * (1 + np.abs(prop.lower) + np.abs(prop.upper))  # float32 rounding of the box's ends
    if np.any(x < prop.lower - slack) or np.any(x > prop.upper + slack):
        return None
    with torch.no_grad():
        y = _flat_outputs(model, torch.from_numpy(x).reshape(shape).to(_device(model))).double().cpu().numpy()
    y = y.reshape(-1)
    if not prop.violated_by(y):
        return None
    if confirm is not None:
        other = confirm(x)
        if other is None or not prop.violated_by(other):
            return None
        y = np.asarray(other, dtype=np.float64).reshape(-1)
    return x.astype(np.float64), y


def attack(model: nn.Module, prop: Property, shape: Tuple[int, ...], *, restarts: int = 10, steps: int = 100,
           seed: int = 0, confirm: Optional[Confirm] = None, deadline: float = float("inf"),
           max_clauses: int = 64, starts: Optional[torch.Tensor] = None) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """PGD in the box on every clause (its violation ``max_j A_j y - b_j`` minimised from the centre and
    ``restarts - 1`` random starts, or from ``starts`` (N, ...) when given); a confirmed counterexample (x, y)
    or None."""
    generator = torch.Generator().manual_seed(seed)
    device = _device(model)
    lower = torch.as_tensor(prop.lower, dtype=torch.float32).reshape(shape)
    upper = torch.as_tensor(prop.upper, dtype=torch.float32).reshape(shape)
    width = upper - lower
    clauses = prop.clauses[:max_clauses]
    # clauses padded to one row count: a padding row 0 @ y - inf never attains the max
    rows = max(len(c.b) for c in clauses)
    A = torch.zeros(len(clauses), rows, prop.num_outputs)
    b = torch.full((len(clauses), rows), float("inf"))
    for k, c in enumerate(clauses):
        A[k, :len(c.b)] = torch.as_tensor(c.A, dtype=torch.float32)
        b[k, :len(c.b)] = torch.as_tensor(c.b, dtype=torch.float32)
    if starts is None:
        starts = torch.cat([(lower + upper) / 2] + [lower + width * torch.rand(shape, generator=generator)
                                                     for _ in range(max(restarts - 1, 0))])
    else:
        starts = torch.max(torch.min(starts.detach().cpu().float().reshape(-1, *shape[1:]), upper), lower)
    lower, upper, A, b = lower.to(device), upper.to(device), A.to(device), b.to(device)
    x = starts.to(device).repeat(len(clauses), *([1] * (len(shape) - 1))).clone()
    owner = torch.arange(len(clauses), device=device).repeat_interleave(len(starts))
    step = width.to(device) * (2.5 / steps)
    for index in range(steps + 1):
        x.requires_grad_(True)
        outputs = _flat_outputs(model, x)
        violation = (torch.einsum("bry,by->br", A[owner], outputs) - b[owner]).max(dim=1).values
        found = (violation <= 0).nonzero().flatten().tolist()
        for i in found:
            candidate = _confirmed(model, prop, x[i].detach().cpu().numpy().reshape(-1), shape, confirm)
            if candidate is not None:
                return candidate
        if index == steps or time.perf_counter() > deadline:
            return None
        gradient, = torch.autograd.grad(violation.sum(), x)
        with torch.no_grad():
            x = torch.max(torch.min(x - step * gradient.sign(), upper), lower)
    return None


def _bound_rows(prop: Property, open_clauses: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    rows = [prop.clauses[k].A for k in open_clauses]
    offsets = [0] + list(np.cumsum([len(r) for r in rows]))
    C = torch.as_tensor(np.concatenate(rows), dtype=torch.float64).unsqueeze(0)
    b = torch.as_tensor(np.concatenate([prop.clauses[k].b for k in open_clauses]), dtype=torch.float64)
    return C, b, offsets


def check_property(model: nn.Module, prop: Property, input_shape: Sequence[int], *, timeout: float = 60.0,
                   methods: Sequence[str] = METHODS, restarts: int = 10, steps: int = 100,
                   seed: int = 0, confirm: Optional[Confirm] = None, milp_max_relus: int = 2000,
                   guard: bool = True, log: Optional[Callable[[str], None]] = None,
                   bab: Optional[BabOptions] = None, began: Optional[float] = None) -> VnnResult:
    """Decide ``prop`` on ``model`` (input of shape ``input_shape``, batch axis first, size 1). The deadline
    is ``timeout`` seconds after ``began`` (a ``time.perf_counter()`` reading; default: now), so a caller's
    start-up counts. ``bab``: the options of branch and bound (the "bab" method: on what the bound methods leave
    open, before milp; default ``BabOptions()``)."""
    began = time.perf_counter() if began is None else began
    # stop a little early: writing the verdict and leaving the process take time too (a run that stopped at the
    # deadline exited 2.3 s after it)
    deadline = began + timeout - min(EXIT_MARGIN, 0.05 * timeout)
    shape = tuple(input_shape)
    stages: List[str] = []

    def note(line: str) -> None:
        stages.append(line)
        if log is not None:
            log(line)

    def result(verdict: str, by: str, counterexample=None) -> VnnResult:
        return VnnResult(verdict, by, time.perf_counter() - began, counterexample, stages)

    if int(np.prod(shape)) != len(prop.lower):
        raise UnsupportedModelError(f"the property has {len(prop.lower)} inputs; the network takes "
                                    f"{int(np.prod(shape))} ({shape})")
    model.eval()
    found = attack(model, prop, shape, restarts=restarts, steps=steps, seed=seed, confirm=confirm, deadline=deadline)
    note(f"attack: {'counterexample' if found is not None else 'none found'} ({time.perf_counter() - began:.2f} s)")
    if found is not None:
        return result("sat", "attack", found)
    device = _device(model)
    lower = torch.as_tensor(prop.lower, dtype=torch.float32).reshape(shape).to(device)
    upper = torch.as_tensor(prop.upper, dtype=torch.float32).reshape(shape).to(device)
    open_clauses = list(range(len(prop.clauses)))
    decided_by = None
    for method in methods:
        if time.perf_counter() > deadline:
            return result("timeout", "-")
        started = time.perf_counter()
        if method == "bab":
            outcome = _branch_and_bound(model, prop, lower, upper, open_clauses, deadline, shape, confirm,
                                        bab, restarts, steps, seed, note)
            if outcome == "timeout":
                return result("timeout", "-")
            if outcome != "unsat":
                return result("sat", "bab", outcome)
            open_clauses = []
            decided_by = "bab"
            break
        if REGISTRY[method].exact:
            outcome = _milp(model, prop, lower[0].cpu(), upper[0].cpu(), open_clauses, deadline, milp_max_relus, shape,
                            confirm)
            if outcome is None:
                note("milp: skipped (needs a small ReLU chain)")
                continue
            open_clauses, counterexample = outcome
            note(f"milp: {len(open_clauses)} clause(s) open ({time.perf_counter() - started:.2f} s)")
            if counterexample is not None:
                return result("sat", "milp", counterexample)
        else:
            C, b, offsets = _bound_rows(prop, open_clauses)
            with torch.no_grad() if method != "alpha-crown" else torch.enable_grad():
                slack = certified_slack(model, lower, upper, C.to(device), b, method=method).numpy()
            proven = [k for i, k in enumerate(open_clauses) if slack[offsets[i]:offsets[i + 1]].max() > 0]
            open_clauses = [k for k in open_clauses if k not in proven]
            note(f"{method}: {len(proven)} clause(s) proven infeasible, {len(open_clauses)} open "
                 f"({time.perf_counter() - started:.2f} s)")
        if not open_clauses:
            decided_by = method
            break
    if decided_by is None:
        return result("timeout" if time.perf_counter() > deadline else "unknown", "-")
    if guard:
        broken = attack(model, prop, shape, restarts=max(2 * restarts, 20), steps=steps, seed=seed + 1, confirm=confirm,
                        deadline=began + timeout - 0.5 * min(EXIT_MARGIN, 0.05 * timeout))
        if broken is not None:
            raise SoundnessError(f"{decided_by} proved the property (unsat), but an attack found a counterexample; "
                                 f"this is a bound-engine bug, not a result")
        note("guard: a second attack found no counterexample")
    return result("unsat", decided_by)


def _branch_and_bound(model, prop: Property, lower: torch.Tensor, upper: torch.Tensor, open_clauses: List[int],
                      deadline: float, shape, confirm, options, restarts: int, steps: int, seed: int, note):
    """"unsat", "timeout" or a confirmed counterexample (x, y): branch and bound on the clauses still open
    (input splitting for networks with few inputs, ReLU splitting otherwise)."""
    from verifiers.bab import Specification, input_branch_and_bound, relu_branch_and_bound
    options = options or BabOptions()
    C, b, offsets = _bound_rows(prop, open_clauses)
    centre = (lower + upper) / 2
    with torch.no_grad():
        logits = _flat_outputs(model, centre).double().cpu().reshape(-1)
    tolerance = RTOL * (1.0 + C[0].abs() @ logits.abs() + b.abs())
    device = lower.device
    spec = Specification(C[0].to(device), b.to(device), [list(range(offsets[i], offsets[i + 1]))
                                                         for i in range(len(open_clauses))], tolerance.to(device))

    def falsify(candidates: torch.Tensor):
        with torch.no_grad():
            outputs = _flat_outputs(model, candidates.reshape(-1, *shape[1:]).float()).double().cpu().numpy()
        for x, y in zip(candidates.reshape(len(candidates), -1).cpu().numpy(), outputs):
            if prop.violated_by(y):
                found = _confirmed(model, prop, x, shape, confirm)
                if found is not None:
                    return found
        return attack(model, prop, shape, steps=min(steps, 30), seed=seed, confirm=confirm, deadline=deadline,
                      starts=candidates[:max(restarts, 1)])

    started = time.perf_counter()
    search = input_branch_and_bound if len(prop.lower) <= options.input_dims else relu_branch_and_bound
    outcome = search(model, lower, upper, spec, deadline=deadline, options=options, falsify=falsify)
    note(f"bab ({'input' if search is input_branch_and_bound else 'relu'} splits): {outcome.verdict}, "
         f"{outcome.domains} domains, depth {outcome.depth} ({time.perf_counter() - started:.2f} s)")
    if outcome.verdict == "sat":
        return outcome.counterexample
    return outcome.verdict


def _milp(model, prop: Property, lower: torch.Tensor, upper: torch.Tensor, open_clauses: List[int], deadline: float,
          max_relus: int, shape, confirm):
    """Exact minima per row: (clauses still open, counterexample or None); None when MILP does not apply."""
    from verifiers.milp import exact_minimum
    if _device(model).type != "cpu":
        return None  # the MILP encoding reads the network on the CPU
    still_open = []
    for k in open_clauses:
        clause = prop.clauses[k]
        infeasible = False
        for row in range(len(clause.b)):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return still_open + [c for c in open_clauses if c >= k], None
            try:
                solved = exact_minimum(model, lower, upper, clause.A[row], time_limit=remaining, max_relus=max_relus)
            except UnsupportedModelError:
                return None
            if solved.margin is None:
                continue
            if solved.margin - clause.b[row] > 0:
                infeasible = True
                break
            if len(clause.b) == 1 and solved.x is not None:  # the exact minimiser satisfies the clause
                candidate = _confirmed(model, prop, solved.x, shape, confirm)
                if candidate is not None:
                    return still_open, candidate
        if not infeasible:
            still_open.append(k)
    return still_open, None
