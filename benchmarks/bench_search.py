"""Time of one search step (architecture step + weight step) per metric, as a ratio to
``--metric none``, measured side by side on the same supernet and batches.

    python -m benchmarks.bench_search [--device cuda] [--repeats 5]

Targets (issue 13): the default CLB step (IBP bound, IBP certified weight steps) <= 3x; the Jacobian term
<= 2x, exact or by a cheaper unbiased estimator: the default draws one class per batch
(``--jacobian-projections 1``), the exact term (K double-backprop passes) is timed beside it. clb with the
CROWN-IBP bound is held to the same 3x. Each variant's weight step is the one its settings resolve to
(``--weight-mode auto``: IBP certified steps, at the full eps, for clb and combined). The JSON names the
CPU and the thread count (``environment``): ratios are only comparable on one CPU (README, Benchmarks).
The "unfused convolutions" row runs the default CLB step with ``verifiers.interval.FUSE_LIMIT = 0`` (value,
centre and radius of every convolution as three calls, the engine before fusion) to show what fusion buys.
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import environment, interleaved_medians, print_table, write_json
from certnas.data import INFO
from certnas.search import Searcher, SearchConfig
from verifiers import interval

VARIANTS = {
    "none": {"term": "none"},
    "none, ibp weight step": {"term": "none", "weight_mode": "ibp"},
    "clb ibp (default)": {"term": "clb", "bound": "ibp"},
    "clb ibp, unfused convolutions": {"term": "clb", "bound": "ibp"},
    "clb crown-ibp": {"term": "clb", "bound": "crown-ibp"},
    "jacobian exact": {"term": "jacobian", "jacobian_projections": 0},
    "jacobian M=1 (default)": {"term": "jacobian", "jacobian_projections": 1},
    "combined": {"term": "combined"},
}
TARGETS = {"clb ibp (default)": 3.0, "clb crown-ibp": 3.0, "jacobian exact": 2.0, "jacobian M=1 (default)": 2.0}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=SearchConfig.layers)
    parser.add_argument("--init-channels", type=int, default=SearchConfig.init_channels)
    parser.add_argument("--batch-size", type=int, default=SearchConfig.batch_size)
    parser.add_argument("--metric-samples", type=int, default=SearchConfig.metric_samples)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_search.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    base = SearchConfig(layers=args.layers, init_channels=args.init_channels, batch_size=args.batch_size,
                        metric_samples=args.metric_samples, device=args.device)
    info = INFO["mnist-embedded"]
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    tasks = {}
    for name, change in VARIANTS.items():
        torch.manual_seed(0)
        searcher = Searcher(replace(base, **change), info)

        # certified weight modes step at the full eps (the ramp's end); standard ones take the clean loss
        plan = {"eps": base.eps, "kappa": 0.0, "beta": 0.0, "progress": 1.0}

        limit = 0 if "unfused" in name else interval.FUSE_LIMIT

        def step(searcher=searcher, plan=plan, limit=limit):
            saved, interval.FUSE_LIMIT = interval.FUSE_LIMIT, limit
            try:
                searcher.arch_step(x, y, x, y)
                searcher.weight_step(x, y, plan)
            finally:
                interval.FUSE_LIMIT = saved
        tasks[name] = step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    medians = interleaved_medians(tasks, args.repeats, args.warmup, sync)
    rows = [{"metric": name, "seconds": round(t, 4), "ratio": round(t / medians["none"], 2), "target": TARGETS.get(name)}
            for name, t in medians.items()]
    env = environment()
    print(f"search step: {args.layers} cells, {args.init_channels} channels, batch {args.batch_size}, "
          f"R on {args.metric_samples or args.batch_size} samples, device {device} ({env['cpu']}), "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats (median)")
    print_table(rows, [("metric", "metric", ""), ("seconds", "seconds", ".3f"), ("ratio", "x none", ".2f"),
                       ("target", "target", "g")])
    write_json(args.out, {"benchmark": "bench_search", "settings": {k: str(v) for k, v in vars(args).items()},
                          "rows": rows, "environment": env})
    return {"rows": rows}


if __name__ == "__main__":
    main()
