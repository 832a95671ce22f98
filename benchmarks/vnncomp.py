"""A VNN-COMP benchmark folder, run and scored as the competition does.

    python -m benchmarks.vnncomp DIR [--networks 256x2] [--out FOLDER] [--threads 2] [--limit N]

DIR holds the competition's layout: an instances CSV (``network,property,timeout`` rows, paths relative to
DIR), the ONNX networks and the VNNLIB properties, and optionally a ``results*.csv`` of verdicts other tools
reported (``network,property,<tool>,...``: SAT / violated, UNSAT / holds, else undecided). Each instance is
decided by ``certnas verify NET --vnnlib PROP --timeout T --result-file F`` in a process of its own, so the
time counts everything (interpreter start, imports, ONNX conversion, the onnxruntime check), as in the
competition; a verdict after the timeout counts as ``timeout``. A ``sat`` verdict is checked here once more:
its counterexample is read from the result file and run through onnxruntime against the property.

Writes, in the output folder: ``instances.csv`` (verdict, seconds, stage that decided, the expected verdict,
correct / wrong / unknown; rewritten after each instance, so an interrupted run resumes where it stopped),
``summary.csv`` / ``summary.md`` per network (the 2021 scoring: 10 points per correct verdict, -100 per wrong
one; the time bonuses need the other tools' times and are left out) and ``run.json`` (command, commit,
threads, minutes).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from benchmarks.common import environment, write_json

RESULTS = Path(__file__).parent / "results" / "vnncomp"
GRACE = 60  # seconds past an instance's timeout before its process is killed (its verdict is late anyway)
COLUMNS = ["network", "property", "timeout", "verdict", "seconds", "decided_by", "expected", "outcome", "note"]


def read_instances(folder: Path) -> List[Tuple[str, str, float]]:
    """(network, property, timeout) of the folder's instances CSV (exactly one ``*instances*.csv``)."""
    found = sorted(folder.glob("*instances*.csv"))
    if len(found) != 1:
        raise ValueError(f"{folder}: expected one instances CSV (*instances*.csv), found {len(found)}")
    rows = []
    for line in csv.reader(found[0].read_text().splitlines()):
        if not line or line[0].startswith("#"):
            continue
        if len(line) != 3:
            raise ValueError(f"{found[0]}: a row needs network,property,timeout, got {line}")
        rows.append((line[0].strip(), line[1].strip(), float(line[2])))
    return rows


def expected_verdicts(folder: Path) -> Dict[Tuple[str, str], str]:
    """(network, property) -> sat / unsat from other tools' reported verdicts (the first decided one)."""
    words = {"sat": "sat", "violated": "sat", "unsat": "unsat", "holds": "unsat"}
    out: Dict[Tuple[str, str], str] = {}
    for path in sorted(folder.glob("results*.csv")):
        for row in list(csv.reader(path.read_text().splitlines()))[1:]:
            decided = [words[v.strip().lower()] for v in row[2:] if v.strip().lower() in words]
            if len(row) >= 2 and decided:
                out[(Path(row[0]).name, Path(row[1]).name)] = decided[0]
    return out


def check_counterexample(result_file: Path, network: Path, prop_path: Path) -> str:
    """'' if the result file's counterexample lies in the box and onnxruntime's outputs on it satisfy the
    property's output constraints; else what is wrong."""
    import numpy as np
    import onnxruntime
    from verifiers.vnnlib import parse_vnnlib
    prop = parse_vnnlib(prop_path)
    values = dict(re.findall(r"\(([XY]_\d+)\s+([-+0-9.eE]+|inf|-inf|nan)\)", result_file.read_text()))
    try:
        x = np.array([float(values[f"X_{i}"]) for i in range(len(prop.lower))], dtype=np.float32)
    except KeyError:
        return "the counterexample lacks some input"
    slack = 1e-6 * (1 + np.abs(prop.lower) + np.abs(prop.upper))
    if np.any(x < prop.lower - slack) or np.any(x > prop.upper + slack):
        return "the counterexample lies outside the input box"
    session = onnxruntime.InferenceSession(str(network), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in feed.shape]
    y = np.asarray(session.run(None, {feed.name: x.reshape(shape)})[0], dtype=np.float64).reshape(-1)
    return "" if prop.violated_by(y) else "onnxruntime's outputs on the counterexample do not violate the property"


def run_instance(folder: Path, network: str, prop: str, timeout: float, threads: int) -> Dict[str, object]:
    """One instance in a fresh process: verdict (a late one is ``timeout``), wall seconds, the stage that
    decided, and a note (a rejected counterexample, an error)."""
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.txt"
        command = [sys.executable, "-m", "certnas.cli", "verify", str(folder / network), "--vnnlib", str(folder / prop),
                   "--timeout", f"{timeout:g}", "--result-file", str(result_file)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        began = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout + GRACE, env=env)
            stderr, code = done.stderr, done.returncode
        except subprocess.TimeoutExpired as expired:
            stderr, code = str(expired.stderr or ""), None
        seconds = time.perf_counter() - began
        verdict = result_file.read_text().split("\n", 1)[0].strip() if result_file.is_file() else ""
        decided = re.search(r"decided by (\S+) in", stderr or "")
        note = ""
        if code is None:
            verdict, note = "timeout", f"killed {GRACE} s after the timeout"
        elif not verdict:
            lines = [line for line in (stderr or "").splitlines() if line.strip()]
            verdict, note = "error", lines[-1][:200] if lines else f"exit code {code}"
        elif seconds > timeout and verdict in ("sat", "unsat"):
            note, verdict = f"{verdict} after the timeout ({seconds:.1f} s)", "timeout"
        if verdict == "sat":
            problem = check_counterexample(result_file, folder / network, folder / prop)
            if problem:
                verdict, note = "error", problem
    return {"verdict": verdict, "seconds": round(seconds, 2),
            "decided_by": decided.group(1) if decided and verdict in ("sat", "unsat") else "", "note": note}


def outcome(verdict: str, expected: Optional[str]) -> str:
    if verdict not in ("sat", "unsat"):
        return "unknown"
    if expected is None:
        return "unchecked"
    return "correct" if verdict == expected else "wrong"


def summarise(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per network: instances, decided, correct / wrong / unknown, the 2021 score, seconds per decided instance."""
    out = []
    for network in dict.fromkeys(r["network"] for r in rows):
        mine = [r for r in rows if r["network"] == network]
        decided = [r for r in mine if r["verdict"] in ("sat", "unsat")]
        counts = {k: sum(r["outcome"] == k for r in mine) for k in ("correct", "wrong", "unknown", "unchecked")}
        seconds = [float(r["seconds"]) for r in decided]
        out.append({"network": network, "instances": len(mine), "decided": len(decided), **counts,
                    "sat": sum(r["verdict"] == "sat" for r in mine), "unsat": sum(r["verdict"] == "unsat" for r in mine),
                    "score (2021 rule)": 10 * counts["correct"] - 100 * counts["wrong"],
                    "median s per decided": round(statistics.median(seconds), 1) if seconds else None,
                    "mean s per decided": round(statistics.fmean(seconds), 1) if seconds else None})
    return out


def _write(out: Path, rows: List[Dict[str, object]]) -> None:
    import pandas as pd
    from benchmarks.paper.tables import markdown
    from certnas.files import atomic_write_text
    atomic_write_text(out / "instances.csv", pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False))
    summary = pd.DataFrame(summarise(rows))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(out / "summary.md", "# VNN-COMP instances decided by certnas\n\nPer network: verdicts, "
                      "outcome against the verdicts other tools reported, the 2021 score (10 per correct, -100 "
                      "per wrong) and seconds per decided instance (a process per instance, start-up included).\n\n"
                      + markdown(summary.astype(object).fillna("")) + "\n")


def _record_run(path: Path, words: List[str], folder: Path, threads: int, seconds: float) -> None:
    """Add this run (command, threads, minutes, environment) to ``run.json``'s list of runs; a resumed run keeps
    the record of the ones before it. The benchmark folder is written as ``<DIR>/name``: the machine's own path
    says nothing to a reader of the committed results."""
    shown = [f"<DIR>/{folder.name}" if Path(word) == folder else word for word in words]
    runs = []
    if path.is_file():
        former = json.loads(path.read_text())
        runs = former.get("runs", [former])
    runs.append({"command": "python -m benchmarks.vnncomp " + " ".join(shown), "threads": threads,
                 "minutes_this_run": round(seconds / 60, 1), "environment": environment()})
    write_json(path, {"folder": folder.name, "runs": runs})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vnncomp", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a benchmark folder in the VNN-COMP layout")
    parser.add_argument("--networks", default="", help="only networks whose file name contains one of these "
                        "comma-separated words (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/vnncomp/<folder name>")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each instance's process")
    parser.add_argument("--limit", type=int, default=0, help="at most this many instances (0: all)")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every instance's timeout")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder}: no such folder")
    if args.threads < 1 or args.limit < 0 or not args.timeout_scale > 0:
        parser.error("--threads must be >= 1, --limit >= 0 and --timeout-scale > 0")
    try:
        instances = read_instances(args.folder)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    words = [w.strip() for w in args.networks.split(",") if w.strip()]
    instances = [i for i in instances if not words or any(w in Path(i[0]).name for w in words)]
    if args.limit:
        instances = instances[:args.limit]
    missing = [p for n, q, _ in instances for p in (n, q) if not (args.folder / p).is_file()]
    if missing:
        parser.error(f"{args.folder}: missing {missing[0]} (and {len(missing) - 1} more)" if len(missing) > 1
                     else f"{args.folder}: missing {missing[0]}")
    out = args.out or RESULTS / args.folder.name
    out.mkdir(parents=True, exist_ok=True)
    expected = expected_verdicts(args.folder)
    done: List[Dict[str, object]] = []
    if (out / "instances.csv").is_file():
        done = list(csv.DictReader((out / "instances.csv").read_text().splitlines()))
    finished = {(r["network"], r["property"]) for r in done}
    began = time.time()
    for count, (network, prop, timeout) in enumerate(instances, 1):
        if (network, prop) in finished:
            continue
        timeout *= args.timeout_scale
        result = run_instance(args.folder, network, prop, timeout, args.threads)
        want = expected.get((Path(network).name, Path(prop).name))
        row = {"network": network, "property": prop, "timeout": timeout, **result, "expected": want or "",
               "outcome": outcome(str(result["verdict"]), want)}
        done.append(row)
        _write(out, done)
        print(f"[{count}/{len(instances)}] {network} {prop}: {row['verdict']} in {row['seconds']} s "
              f"({row['decided_by'] or row['note'] or '-'}), expected {want or '?'}: {row['outcome']}", flush=True)
    _write(out, done)
    _record_run(out / "run.json", list(argv or sys.argv[1:]), args.folder, args.threads, time.time() - began)
    for line in summarise(done):
        print("  ".join(f"{k} {v}" for k, v in line.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
