"""VNNLIB properties (the VNN-COMP subset): one input box, and output constraints that are any and / or
combination of linear inequalities.

A VNNLIB file describes a counterexample: the property is violated (``sat``) when some input in the
box gives outputs that satisfy the output constraints, and holds (``unsat``) when none does::

    (declare-const X_0 Real)            ; inputs X_0 .. X_{n-1}, the ONNX input flattened in C order
    (declare-const Y_0 Real)            ; outputs Y_0 .. Y_{m-1}
    (assert (>= X_0 0.1)) (assert (<= X_0 0.3))
    (assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0))))

Terms may be numbers, variables, ``(+ ...)``, ``(- ...)`` and ``(* number term)``; comparisons are
``<=``, ``>=``, ``<`` and ``>`` (strict ones are read as non-strict, as VNN-COMP does). The output
constraints become a disjunction of clauses, each a conjunction ``A y <= b``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

from verifiers.errors import VerifierError

MAX_CLAUSES = 10000
_VARIABLE = re.compile(r"^([XY])_(\d+)$")
_TOKEN = re.compile(r"\(|\)|[^\s()]+")


class VnnlibError(VerifierError):
    """A property file outside the supported subset, or malformed."""


@dataclass
class Clause:
    """``A @ y <= b`` (every row)."""
    A: np.ndarray
    b: np.ndarray


@dataclass
class Property:
    """The input box ``lower <= x <= upper`` (flattened) and the output constraints: satisfied by y when
    some clause holds."""
    lower: np.ndarray
    upper: np.ndarray
    clauses: List[Clause]
    num_outputs: int

    def violated_by(self, outputs: np.ndarray, tolerance: float = 0.0) -> bool:
        """Whether ``outputs`` (flattened) satisfy the output constraints (a counterexample)."""
        y = np.asarray(outputs, dtype=np.float64).reshape(-1)
        return any(bool(np.all(c.A @ y - c.b <= tolerance)) for c in self.clauses)


Expr = Union[str, list]
Linear = Tuple[Dict[Tuple[str, int], float], float]  # coefficients per variable, constant


def _parse_sexprs(text: str, name: str) -> List[Tuple[Expr, int]]:
    """Top-level s-expressions with the line each starts on (comments removed)."""
    expressions: List[Tuple[Expr, int]] = []
    stack: List[list] = []
    starts: List[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        for token in _TOKEN.findall(line.split(";", 1)[0]):
            if token == "(":
                stack.append([])
                starts.append(number)
            elif token == ")":
                if not stack:
                    raise VnnlibError(f"{name}: line {number}: unbalanced ')'")
                done = stack.pop()
                start = starts.pop()
                if stack:
                    stack[-1].append(done)
                else:
                    expressions.append((done, start))
            elif stack:
                stack[-1].append(token)
            else:
                raise VnnlibError(f"{name}: line {number}: {token!r} outside parentheses")
    if stack:
        raise VnnlibError(f"{name}: line {starts[-1]}: '(' never closed")
    return expressions


def _number(token: str):
    try:
        return float(token)
    except ValueError:
        return None


def _linear(expr: Expr, where: str, declared: Dict[str, int]) -> Linear:
    if isinstance(expr, str):
        value = _number(expr)
        if value is not None:
            return {}, value
        match = _VARIABLE.match(expr)
        if not match or expr not in declared:
            raise VnnlibError(f"{where}: undeclared variable or bad term {expr!r}")
        return {(match.group(1), int(match.group(2))): 1.0}, 0.0
    if not expr:
        raise VnnlibError(f"{where}: empty term ()")
    head, args = expr[0], expr[1:]
    if head in ("+", "-") and args:
        parts = [_linear(a, where, declared) for a in args]
        if head == "-" and len(parts) == 1:
            parts = [({}, 0.0), parts[0]]
        coefficients: Dict[Tuple[str, int], float] = {}
        constant = 0.0
        for index, (terms, value) in enumerate(parts):
            sign = -1.0 if head == "-" and index > 0 else 1.0
            constant += sign * value
            for key, c in terms.items():
                coefficients[key] = coefficients.get(key, 0.0) + sign * c
        return coefficients, constant
    if head == "*" and len(args) >= 2:
        parts = [_linear(a, where, declared) for a in args]
        variable_parts = [p for p in parts if p[0]]
        if len(variable_parts) > 1:
            raise VnnlibError(f"{where}: product of two variables (only linear constraints are supported)")
        factor = float(np.prod([p[1] for p in parts if not p[0]]))
        if not variable_parts:
            return {}, factor
        terms, value = variable_parts[0]
        return {k: factor * c for k, c in terms.items()}, factor * value
    raise VnnlibError(f"{where}: unsupported term {_show(expr)}")


def _show(expr: Expr) -> str:
    text = expr if isinstance(expr, str) else "(" + " ".join(_show(e) for e in expr) + ")"
    return text if len(text) <= 80 else text[:77] + "..."


def _atom(expr: list, where: str, declared: Dict[str, int]) -> Linear:
    """A comparison as ``terms + constant <= 0``."""
    if len(expr) != 3:
        raise VnnlibError(f"{where}: a comparison takes two terms: {_show(expr)}")
    op, left, right = expr
    a_terms, a_const = _linear(left, where, declared)
    b_terms, b_const = _linear(right, where, declared)
    if op in ("<=", "<"):
        sign = 1.0
    elif op in (">=", ">"):
        sign = -1.0
    else:
        raise VnnlibError(f"{where}: unsupported comparison {op!r} (use <=, >=, <, >)")
    terms = dict((k, sign * v) for k, v in a_terms.items())
    for key, value in b_terms.items():
        terms[key] = terms.get(key, 0.0) - sign * value
    return {k: v for k, v in terms.items() if v != 0.0}, sign * (a_const - b_const)


def _dnf(expr: Expr, where: str, declared: Dict[str, int]) -> List[List[Linear]]:
    """The formula as a disjunction (outer list) of conjunctions of atoms."""
    if isinstance(expr, str) or not expr:
        raise VnnlibError(f"{where}: expected a formula, got {_show(expr)}")
    head = expr[0]
    if head == "and":
        result: List[List[Linear]] = [[]]
        for part in expr[1:]:
            options = _dnf(part, where, declared)
            result = [left + right for left in result for right in options]
            if len(result) > MAX_CLAUSES:
                raise VnnlibError(f"{where}: more than {MAX_CLAUSES} clauses once expanded")
        return result
    if head == "or":
        result = [clause for part in expr[1:] for clause in _dnf(part, where, declared)]
        if not result:
            raise VnnlibError(f"{where}: empty (or)")
        return result
    if head in ("<=", ">=", "<", ">"):
        return [[_atom(expr, where, declared)]]
    raise VnnlibError(f"{where}: unsupported formula {_show(expr)} (and, or, <=, >=, <, > are supported)")


def parse_vnnlib(path, *, num_inputs: int = None, num_outputs: int = None) -> Property:
    """Read a VNNLIB file; VnnlibError (one line naming the file and line) outside the supported subset.
    ``num_inputs`` / ``num_outputs``: the network's sizes, checked against the declarations."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise VnnlibError(f"{name}: cannot read ({error.strerror if isinstance(error, OSError) else 'not text'})") \
            from None
    declared: Dict[str, int] = {}
    input_atoms: List[Tuple[Linear, str]] = []
    output_formulas: List[List[List[Linear]]] = []
    for expr, line in _parse_sexprs(text, name):
        where = f"{name}: line {line}"
        if not expr or not isinstance(expr[0], str):
            raise VnnlibError(f"{where}: expected declare-const or assert, got {_show(expr)}")
        if expr[0] == "declare-const":
            if len(expr) != 3 or not isinstance(expr[1], str) or not _VARIABLE.match(expr[1]) or expr[2] != "Real":
                raise VnnlibError(f"{where}: expected (declare-const X_i Real) or (declare-const Y_i Real), "
                                  f"got {_show(expr)}")
            declared[expr[1]] = line
        elif expr[0] == "assert":
            if len(expr) != 2:
                raise VnnlibError(f"{where}: assert takes one formula")
            clauses = _dnf(expr[1], where, declared)
            kinds = {key[0] for clause in clauses for terms, _ in clause for key in terms}
            if kinds == {"X"}:
                if len(clauses) != 1:
                    raise VnnlibError(f"{where}: a disjunction of input regions is not supported (one box only)")
                input_atoms += [(atom, where) for atom in clauses[0]]
            elif kinds == {"Y"}:
                output_formulas.append(clauses)
            elif not kinds:
                raise VnnlibError(f"{where}: a constraint without variables")
            else:
                raise VnnlibError(f"{where}: a constraint mixing inputs and outputs is not supported")
        else:
            raise VnnlibError(f"{where}: unsupported command {expr[0]!r} (declare-const and assert are supported)")
    inputs = sorted(int(v[2:]) for v in declared if v.startswith("X_"))
    outputs = sorted(int(v[2:]) for v in declared if v.startswith("Y_"))
    if not inputs or inputs != list(range(len(inputs))):
        raise VnnlibError(f"{name}: inputs must be declared as X_0 .. X_(n-1)")
    if not outputs or outputs != list(range(len(outputs))):
        raise VnnlibError(f"{name}: outputs must be declared as Y_0 .. Y_(m-1)")
    if num_inputs is not None and len(inputs) != num_inputs:
        raise VnnlibError(f"{name}: declares {len(inputs)} inputs; the network has {num_inputs}")
    if num_outputs is not None and len(outputs) != num_outputs:
        raise VnnlibError(f"{name}: declares {len(outputs)} outputs; the network has {num_outputs}")
    lower = np.full(len(inputs), -np.inf)
    upper = np.full(len(inputs), np.inf)
    for (terms, constant), where in input_atoms:
        if len(terms) != 1:
            raise VnnlibError(f"{where}: input constraints must bound one variable (a box)")
        (_, index), coefficient = next(iter(terms.items()))
        bound = -constant / coefficient  # coefficient * x + constant <= 0
        if coefficient > 0:
            upper[index] = min(upper[index], bound)
        else:
            lower[index] = max(lower[index], bound)
    missing = [i for i in range(len(inputs)) if not (np.isfinite(lower[i]) and np.isfinite(upper[i]))]
    if missing:
        raise VnnlibError(f"{name}: input X_{missing[0]} needs a lower and an upper bound "
                          f"({len(missing)} input(s) unbounded)")
    if (lower > upper).any():
        index = int(np.argmax(lower > upper))
        raise VnnlibError(f"{name}: the input box is empty at X_{index} ({lower[index]:g} > {upper[index]:g})")
    if not output_formulas:
        raise VnnlibError(f"{name}: no output constraint")
    combined: List[List[Linear]] = [[]]
    for clauses in output_formulas:
        combined = [left + right for left in combined for right in clauses]
        if len(combined) > MAX_CLAUSES:
            raise VnnlibError(f"{name}: more than {MAX_CLAUSES} output clauses once expanded")
    result = []
    for clause in combined:
        A = np.zeros((len(clause), len(outputs)))
        b = np.zeros(len(clause))
        for row, (terms, constant) in enumerate(clause):
            for (_, index), coefficient in terms.items():
                A[row, index] += coefficient
            b[row] = -constant
        result.append(Clause(A, b))
    return Property(lower, upper, result, len(outputs))
