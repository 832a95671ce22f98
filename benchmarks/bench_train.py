"""Time of one training step per mode, as a ratio to ``standard``, measured side by side on the same
network and batches (an epoch is a fixed number of such steps, so the ratio is the per-epoch ratio).

    python -m benchmarks.bench_train [--device cuda] [--repeats 5]

The robust modes are timed at full eps (after warm-up). ``crown-ibp (ramp)`` is a step during the ramp,
where the CROWN-IBP and IBP bounds are both computed and mixed (beta = 0.5); ``crown-ibp`` is beta = 1.
Targets (issue 4): ibp <= 2.5x, crown-ibp <= 6x.
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import environment, interleaved_medians, print_table, write_json
from certnas.data import INFO
from certnas.train import Trainer, TrainConfig, network_config

VARIANTS = {
    "standard": ({"mode": "standard"}, {"eps": 0.0, "kappa": 1.0, "beta": 1.0}),
    "pgd (7 steps)": ({"mode": "pgd"}, {"eps": 0.1, "kappa": 1.0, "beta": 1.0}),
    "ibp": ({"mode": "ibp"}, {"eps": 0.1, "kappa": 0.5, "beta": 0.0}),
    "crown-ibp": ({"mode": "crown-ibp"}, {"eps": 0.1, "kappa": 0.5, "beta": 1.0}),
    "crown-ibp (ramp)": ({"mode": "crown-ibp"}, {"eps": 0.05, "kappa": 0.75, "beta": 0.5}),
}
TARGETS = {"ibp": 2.5, "crown-ibp": 6.0}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=TrainConfig.layers)
    parser.add_argument("--init-channels", type=int, default=TrainConfig.init_channels)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--genotype", default=TrainConfig.genotype)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_train.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    base = TrainConfig(layers=args.layers, init_channels=args.init_channels, batch_size=args.batch_size,
                       genotype=args.genotype, device=args.device)
    info = INFO["mnist-embedded"]
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    tasks = {}
    for name, (change, plan) in VARIANTS.items():
        torch.manual_seed(0)
        config = replace(base, **change)
        trainer = Trainer(config, network_config(config, info))
        tasks[name] = lambda trainer=trainer, plan=plan: trainer.step(x, y, plan)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    medians = interleaved_medians(tasks, args.repeats, args.warmup, sync)
    rows = [{"mode": name, "seconds": round(t, 4), "ratio": round(t / medians["standard"], 2), "target": TARGETS.get(name)}
            for name, t in medians.items()]
    print(f"training step: {args.genotype}, {args.layers} cells, {args.init_channels} channels, batch {args.batch_size}, "
          f"device {device}, {args.repeats} interleaved repeats (median)")
    print_table(rows, [("mode", "mode", ""), ("seconds", "seconds", ".3f"), ("ratio", "x standard", ".2f"),
                       ("target", "target", "g")])
    write_json(args.out, {"benchmark": "bench_train", "settings": {k: str(v) for k, v in vars(args).items()},
                          "rows": rows, "environment": environment()})
    return {"rows": rows}


if __name__ == "__main__":
    main()
