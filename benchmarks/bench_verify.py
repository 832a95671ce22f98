"""Verification speed: samples per second per method on a reference model, and the batched certified
radius bisection as a speed-up over a per-sample bisection loop, measured in the same run.

    python -m benchmarks.bench_verify [--device cuda] [--n 32]

Reference models (untrained weights; speed does not depend on them): the default DARTS network of
``certnas train`` (PC_DARTS cell; cells and channels from ``TrainConfig``, ``--layers`` /
``--init-channels``; 28x28) for ibp / crown-ibp, and a 784-128-128-10
MLP for crown / alpha-crown / milp; full CROWN and alpha-CROWN on the DARTS network too, on
``--crown-n`` / ``--alpha-n`` samples (0: skip). Target (issue 5): batched bisection >= 5x the per-sample loop.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import environment, print_table, write_json
from certnas.data import INFO, load_data
from certnas.io import load_model
from certnas.space.network import NetworkConfig, build_network
from certnas.train import TrainConfig, network_config
from verifiers.radius import certified_radius
from verifiers.verify import verify_methods


def _timed(task) -> float:
    start = time.perf_counter()
    task()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--milp-n", type=int, default=4)
    parser.add_argument("--crown-n", type=int, default=8, help="samples for full CROWN on the DARTS network")
    parser.add_argument("--alpha-n", type=int, default=2, help="samples for alpha-CROWN on the DARTS network")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=TrainConfig.layers)
    parser.add_argument("--init-channels", type=int, default=TrainConfig.init_channels)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--model", type=Path, default=None,
                        help="a trained certnas model file for the DARTS rows, on embedded test digits "
                             "(CROWN's cost grows with the unstable ReLUs, so untrained weights overstate it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_verify.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    info = INFO["mnist-embedded"]
    torch.manual_seed(0)
    if args.model:
        darts = load_model(args.model, map_location=device)
    else:
        darts = build_network(network_config(TrainConfig(layers=args.layers, init_channels=args.init_channels), info))
    mlp = build_network(NetworkConfig("mlp", 1, 28, 10, info.mean, info.std, hidden=(args.hidden, args.hidden)))
    darts, mlp = darts.to(device).eval(), mlp.to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.n, 1, 28, 28, generator=g).to(device)
    with torch.no_grad():
        y_darts, y_mlp = darts(x).argmax(1), mlp(x).argmax(1)
    if args.model:  # real digits and labels: a trained network's unstable neurons depend on the data
        test = load_data("mnist-embedded", seed=0, image_size=28).test
        x = torch.stack([test[i][0] for i in range(args.n)]).to(device)
        y_darts = torch.as_tensor([int(test[i][1]) for i in range(args.n)], device=device)
    rows = []
    for name, model, y, method, count in [("darts", darts, y_darts, "ibp", args.n), ("darts", darts, y_darts, "crown-ibp", args.n),
                                          ("darts", darts, y_darts, "crown", args.crown_n),
                                          ("darts", darts, y_darts, "alpha-crown", args.alpha_n),
                                          ("mlp", mlp, y_mlp, "ibp", args.n), ("mlp", mlp, y_mlp, "crown-ibp", args.n),
                                          ("mlp", mlp, y_mlp, "crown", args.n), ("mlp", mlp, y_mlp, "alpha-crown", args.n),
                                          ("mlp", mlp, y_mlp, "milp", args.milp_n)]:
        if count < 1:
            continue
        verify_methods(model, x[:1], y[:1], 0.01, methods=[method])  # warm-up (tracing)
        seconds = _timed(lambda: verify_methods(model, x[:count], y[:count], 0.01, methods=[method]))
        rows.append({"what": f"{name} {method}", "samples": count, "seconds": round(seconds, 3),
                     "samples_per_s": round(count / seconds, 2)})
    for method in ("ibp", "crown-ibp"):
        batched = _timed(lambda: certified_radius(darts, x, y_darts, method=method, steps=args.steps))
        loop = _timed(lambda: [certified_radius(darts, x[i:i + 1], y_darts[i:i + 1], method=method, steps=args.steps)
                               for i in range(args.n)])
        rows.append({"what": f"radius darts {method} batched", "samples": args.n, "seconds": round(batched, 3),
                     "samples_per_s": round(args.n / batched, 2), "speedup": round(loop / batched, 2), "target": 5.0})
        rows.append({"what": f"radius darts {method} per-sample", "samples": args.n, "seconds": round(loop, 3),
                     "samples_per_s": round(args.n / loop, 2)})
    print(f"verification: {args.n} samples (milp {args.milp_n}), radius bisection {args.steps} steps, device {device}")
    print_table(rows, [("what", "what", ""), ("samples", "n", "d"), ("seconds", "seconds", ".3f"),
                       ("samples_per_s", "samples/s", ".2f"), ("speedup", "x loop", ".2f"), ("target", "target", "g")])
    write_json(args.out, {"benchmark": "bench_verify", "settings": {k: str(v) for k, v in vars(args).items()},
                          "rows": rows, "environment": environment()})
    return {"rows": rows}


if __name__ == "__main__":
    main()
