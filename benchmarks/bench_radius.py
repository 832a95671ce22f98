"""Full-CROWN certified radii: the bisection of before against the root search of ``verifiers.radius``.

    python -m benchmarks.bench_radius [--model model.pt] [--n 3] [--norms inf,2] [--threads 2]

On one network and the same test digits, in one run: per digit and norm, the seconds and radius of
(a) ``bisection``: auto_LiRPA's CROWN bisected as the paper tables did before (10 steps in log space on
[1e-6, PGD radius]) and (b) ``root search``: ``verifiers.radius.crown_radius`` on the tape engine. Each
method runs in a process of its own, so its peak resident memory is its own. Prints the medians, the
speed-up and the smallest radius ratio (goals: >= 15x, every radius >= 0.99 of the bisection's); writes
``results/bench_radius.json``. The default network is the paper tables' cpu-scale DSRNA-CB cell, seed 0,
trained by the pipeline if its model file is missing (about a minute). Expect an hour or more: the bisection
side costs 10-20 minutes per digit and norm on 2 cores.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.common import environment, print_table, write_json

RESULTS = Path(__file__).parent / "results"
EPS_MAX = {"inf": 0.5, "2": 5.0}
EPS_MIN, STEPS, PGD_STEPS = 1e-6, 10, 10


def _default_model() -> Path:
    from benchmarks.paper.pipeline import Pipeline
    from benchmarks.paper.scales import SCALES
    pipeline = Pipeline(SCALES["cpu"], RESULTS / "cpu", None, "cpu")
    model = pipeline.train("DSRNA-CB", "mnist", 0) / "model.pt"
    pipeline.ensure_model(model)
    return model


def _shown(path: Path) -> str:
    """A model path as the record shows it: relative to the repository where it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return str(path)


def _measure(method: str, model_path: str, n: int, norm: str, threads: int) -> Dict[str, Any]:
    """Runs in a fresh process: radii and seconds of one method on the first ``n`` correctly classified digits
    (a misclassified one has radius 0 whatever the method), and the process's peak memory."""
    import torch
    from certnas.evaluation import prepare
    from certnas.verify_run import VerifyConfig, falsifier_for
    from verifiers.radius import certified_radius, crown_radius
    from verifiers.verify import attack_radius
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    evaluation = prepare(Path(model_path), data=None, data_root=None, n=100, seed=0, device="cpu")
    model = evaluation.model
    falsifier = falsifier_for(model, VerifyConfig(norm=norm, pgd_steps=PGD_STEPS))
    with torch.no_grad():
        correct = (model(evaluation.x).argmax(1) == evaluation.y).nonzero().flatten().tolist()
    indices = correct[:n]
    rows = []
    for i in indices:
        x, y = evaluation.x[i:i + 1], evaluation.y[i:i + 1]
        upper = attack_radius(model, x, y, falsifier, eps_max=EPS_MAX[norm], steps=STEPS)
        began = time.perf_counter()
        with torch.no_grad():
            if method == "bisection":
                radius = float(certified_radius(model, x, y, norm=norm, method="crown", eps_max=upper, steps=STEPS,
                                                eps_min=EPS_MIN, engine="lirpa")[0])
                probes = None
            else:
                found, traces = crown_radius(model, x, y, norm=norm, upper=upper, eps_min=EPS_MIN)
                radius, probes = float(found[0]), len(traces[0].probes) - 1
        rows.append({"digit": int(evaluation.indices[i]), "norm": norm, "method": method, "radius": radius,
                     "seconds": round(time.perf_counter() - began, 2), "probes": probes, "pgd_radius": float(upper)})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "peak_mb": round(peak_mb, 1)}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a certnas model file (default: see above)")
    parser.add_argument("--n", type=int, default=3,
                        help="test digits (the first n correctly classified of the pipeline's verify samples)")
    parser.add_argument("--norms", default="inf,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_radius.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    if args.n < 1 or args.threads < 1 or not norms or any(n not in EPS_MAX for n in norms):
        parser.error("need --n >= 1, --threads >= 1 and --norms from: inf, 2")
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    model = args.model or _default_model()
    began = time.time()
    rows: List[Dict[str, Any]] = []
    memory: Dict[str, float] = {}
    context = multiprocessing.get_context("spawn")
    for norm in norms:
        for method in ("root search", "bisection"):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                result = pool.submit(_measure, method, str(model), args.n, norm, args.threads).result()
            rows += result["rows"]
            memory[f"{method} {norm}"] = result["peak_mb"]
            for row in result["rows"]:
                print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    summary = {}
    for norm in norms:
        mine = {m: [r for r in rows if r["norm"] == norm and r["method"] == m] for m in ("root search", "bisection")}
        seconds = {m: statistics.median(r["seconds"] for r in v) for m, v in mine.items()}
        ratios = [a["radius"] / b["radius"] for a, b in zip(mine["root search"], mine["bisection"]) if b["radius"] > 0]
        summary[norm] = {"median_seconds": seconds, "speedup": seconds["bisection"] / seconds["root search"],
                         "smallest_radius_ratio": min(ratios) if ratios else None,
                         "largest_relative_difference": max(abs(r - 1) for r in ratios) if ratios else None,
                         "median_probes": statistics.median(r["probes"] for r in mine["root search"]),
                         "peak_mb": {m: memory[f"{m} {norm}"] for m in mine}}
    record = {"benchmark": "bench_radius", "command": " ".join(["python -m benchmarks.bench_radius", *argv]),
              "model": _shown(model), "threads": args.threads, "digits": args.n, "minutes": round((time.time() - began) / 60, 1),
              "rows": rows, "summary": summary, "environment": environment()}
    write_json(args.out, record)
    print_table([{"norm": n, **{k: v for k, v in s.items() if not isinstance(v, dict)},
                  **{f"{m} s": t for m, t in s["median_seconds"].items()}} for n, s in summary.items()],
                [("norm", "norm", "s"), ("root search s", "root s", ".1f"), ("bisection s", "bisect s", ".1f"),
                 ("speedup", "speed-up", ".1f"), ("smallest_radius_ratio", "min ratio", ".4f"),
                 ("median_probes", "probes", ".1f")])
    return record


if __name__ == "__main__":
    main()
