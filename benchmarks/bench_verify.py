"""Verification speed: samples per second per method on a reference model, and the batched certified
radius bisection as a speed-up over a per-sample bisection loop, measured in the same run.

    python -m benchmarks.bench_verify [--device cuda] [--n 32]

Reference models (untrained weights; speed does not depend on them): the default DARTS network of
``certnas train`` (PC_DARTS cell; cells and channels from ``TrainConfig``, ``--layers`` /
``--init-channels``; 28x28) for ibp / crown-ibp, and a 784-128-128-10
MLP for crown / alpha-crown / milp; full CROWN and alpha-CROWN on the DARTS network too, on
``--crown-n`` / ``--alpha-n`` samples (0: skip). Target (issue 5): batched bisection >= 5x the per-sample loop.
Branch and bound (``--bab-n`` samples, ``--bab-seconds`` each): on the MLP at an eps between the CROWN and the
PGD radius of each sample (the ball CROWN leaves open), in a process of its own: subdomains bounded per
second and the process's peak resident memory.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
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


def _bab_measure(hidden: int, n: int, seconds: float, threads: int) -> dict:
    """In a fresh process: ReLU branch and bound on ``n`` random inputs of an untrained 784-h-h-10 MLP, each at
    the geometric mean of its CROWN radius and its PGD radius, ``seconds`` per sample."""
    from certnas.verify_run import VerifyConfig, falsifier_for
    from verifiers.radius import crown_radius
    from verifiers.verify import attack_radius, bab_sample
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    info = INFO["mnist-embedded"]
    torch.manual_seed(1)
    mlp = build_network(NetworkConfig("mlp", 1, 28, 10, info.mean, info.std, hidden=(hidden, hidden))).eval()
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = mlp(x).argmax(1)
        upper = attack_radius(mlp, x, y, falsifier_for(mlp, VerifyConfig(norm="inf", pgd_steps=20)), eps_max=0.5,
                              steps=10)
        certified, _ = crown_radius(mlp, x, y, norm="inf", upper=upper)
    eps = (certified.clamp_min(1e-6) * upper).sqrt()
    began = time.perf_counter()
    results = [bab_sample(mlp, x[i:i + 1], int(y[i]), float(eps[i]), seconds) for i in range(n)]
    total, spent = sum(r.domains for r in results), sum(r.seconds for r in results)
    return {"what": f"mlp bab ({seconds:g} s each)", "samples": n, "seconds": round(time.perf_counter() - began, 3),
            "subdomains": total, "subdomains_per_s": round(total / spent, 1) if spent else None,
            "verdicts": ",".join(r.verdict for r in results),
            "peak_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--milp-n", type=int, default=4)
    parser.add_argument("--crown-n", type=int, default=8, help="samples for full CROWN on the DARTS network")
    parser.add_argument("--alpha-n", type=int, default=2, help="samples for alpha-CROWN on the DARTS network")
    parser.add_argument("--bab-n", type=int, default=4, help="samples for branch and bound on the MLP (0: skip)")
    parser.add_argument("--bab-seconds", type=float, default=20.0, help="branch and bound time per sample")
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
    if args.bab_n < 0 or args.bab_seconds <= 0:
        parser.error("need --bab-n >= 0 and --bab-seconds > 0")
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
    if args.bab_n > 0:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows.append(pool.submit(_bab_measure, args.hidden, args.bab_n, args.bab_seconds,
                                    torch.get_num_threads()).result())
    print(f"verification: {args.n} samples (milp {args.milp_n}), radius bisection {args.steps} steps, device {device}")
    print_table(rows, [("what", "what", ""), ("samples", "n", "d"), ("seconds", "seconds", ".3f"),
                       ("samples_per_s", "samples/s", ".2f"), ("speedup", "x loop", ".2f"), ("target", "target", "g"),
                       ("subdomains_per_s", "subdomains/s", ".1f"), ("peak_MiB", "peak MiB", ".0f")])
    write_json(args.out, {"benchmark": "bench_verify", "settings": {k: str(v) for k, v in vars(args).items()},
                          "rows": rows, "environment": environment()})
    return {"rows": rows}


if __name__ == "__main__":
    main()
