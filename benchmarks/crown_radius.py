"""Certified radius of full CROWN against CROWN-IBP on one trained network, sample by sample.

    python -m benchmarks.crown_radius --model runs/standard/model.pt [--n 8] [--steps 6]

Per embedded test digit: the PGD attack radius (an upper bound on the true radius), then the CROWN-IBP and
the CROWN radius (``verifiers.verify.radii``: log-space bisection on [eps_min, attack radius], every
radius attacked by the soundness guard). Prints the medians and their ratio; the JSON is rewritten after
every digit, so an interrupted run keeps what it measured. CROWN's cost grows with the unstable ReLUs:
on a standard-trained network expect minutes per digit on a CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import environment, print_table, write_json
from certnas.data import load_data
from certnas.io import ModelFileError, load_model_with_meta
from certnas.verify_run import VerifyConfig, falsifier_for
from verifiers.verify import METHODS, VerifyOptions, attack_radius, radii


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a certnas model file trained on 28x28 digits")
    parser.add_argument("--n", type=int, default=8, help="test digits (the first n of the embedded test split)")
    parser.add_argument("--methods", default="crown-ibp,crown")
    parser.add_argument("--eps-min", type=float, default=1e-6)
    parser.add_argument("--eps-max", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=6, help="bisection steps per method and digit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "crown_radius.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS or m == "milp"]
    if not methods or unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(m for m in METHODS if m != 'milp')}")
    if args.n < 1 or args.steps < 1 or not 0 < args.eps_min < args.eps_max:
        parser.error("need --n >= 1, --steps >= 1 and 0 < --eps-min < --eps-max")
    try:
        model, meta = load_model_with_meta(args.model, map_location=device)
    except ModelFileError as error:
        parser.error(str(error))
    network = meta["network"]
    if (network.get("in_channels"), network.get("image_size"), network.get("num_classes")) != (1, 28, 10):
        parser.error(f"{args.model}: needs a network of 1x28x28 digits and 10 classes (the embedded test digits)")
    test = load_data("mnist-embedded", seed=0, image_size=28).test
    falsifier = falsifier_for(model, VerifyConfig())
    rows = []

    def medians() -> dict:
        found = {key: [r[key] for r in rows] for key in ["attack"] + methods}
        return {key: statistics.median(values) for key, values in found.items() if values}

    def save() -> dict:
        middle = medians()
        summary = {"medians": middle, "samples": len(rows),
                   "ratio": {f"{b}/{a}": middle[b] / middle[a] for a in methods for b in methods
                             if a != b and middle.get(a, 0) > 0}}
        write_json(args.out, {"benchmark": "crown_radius", "settings": {k: str(v) for k, v in vars(args).items()},
                              "rows": rows, "summary": summary, "environment": environment()})
        return summary

    for i in range(args.n):
        x = test[i][0].unsqueeze(0).to(device)
        y = torch.tensor([int(test[i][1])], device=device)
        upper = attack_radius(model, x, y, falsifier, eps_max=args.eps_max, steps=args.steps)
        row = {"index": i, "label": int(y), "attack": float(upper)}
        for method in methods:
            began = time.perf_counter()
            found = radii(model, x, y, methods=[method], eps_max=args.eps_max, steps=args.steps, eps_min=args.eps_min,
                          falsifier=falsifier, attack_upper=upper, options=VerifyOptions(crown_max_relus=0))
            row[method], row[f"{method} s"] = found[0].radius, round(time.perf_counter() - began, 1)
        rows.append(row)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        summary = save()
    columns = [("index", "digit", "d"), ("attack", "PGD radius", ".4g")]
    columns += [c for m in methods for c in ((m, f"{m} radius", ".4g"), (f"{m} s", "s", ".1f"))]
    print_table(rows, columns)
    print(f"medians over {len(rows)} digits: " + ", ".join(f"{k} {v:.4g}" for k, v in summary["medians"].items()))
    for name, value in summary["ratio"].items():
        print(f"median ratio {name}: {value:.3g}")
    return summary


if __name__ == "__main__":
    main()
