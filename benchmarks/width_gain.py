"""How much each DARTS operation, cell and network depth widens IBP bounds: why some networks are
hard to certify.

    python -m benchmarks.width_gain [--seeds 3]

Gain = mean IBP interval radius at the output / mean radius of the input ball, at a tiny eps (so
that it measures the network, not ReLU saturation), on embedded MNIST digits, training-mode batch
norm, untrained weights. A margin is certified only when the gain times eps stays below it, so the
gain is what certified training has to remove.

- ``operation``: one operation on 8 channels between a 3x3 conv + batch norm stem and nothing else,
  output radius over the radius entering the operation (stride 1, 28x28).
- ``network``: the margin bound's width over eps for DARTS networks of each published cell, by
  depth, width and stem (the margins of the margin specification, logits to the classifier).
"""
from __future__ import annotations

import argparse
import statistics
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.common import environment, print_table, write_json
from certnas.data import INFO, load_data
from certnas.space.genotype import NAMED
from certnas.space.ops import OPS, PRIMITIVES
from certnas.train import TrainConfig, network_config
from certnas.space.network import build_network
from verifiers.interval import Interval, interval_margins

PROBE_EPS = 1e-6
NETWORKS = [(1, 8, "cifar"), (2, 8, "cifar"), (3, 8, "cifar"), (4, 8, "cifar"), (2, 16, "strided"), (2, 32, "strided")]


def _digits(count: int = 64):
    splits = load_data("mnist-embedded")
    x = torch.stack([splits.train[i][0] for i in range(count)])
    y = torch.tensor([int(splits.train[i][1]) for i in range(count)])
    return x, y


def operation_gain(name: str, x: torch.Tensor, seed: int, channels: int = 8) -> float:
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)).train()
    op = OPS[name](channels, 1, True).train()
    with torch.no_grad():
        entering = stem(Interval.from_ball(x, PROBE_EPS))
        leaving = op(entering)
    if not isinstance(leaving, Interval):  # `none`: the output does not depend on the input
        return 0.0
    return (leaving.radius.mean() / entering.radius.mean()).item()


def network_gain(genotype: str, layers: int, channels: int, stem: str, x, y, seed: int) -> float:
    torch.manual_seed(seed)
    config = replace(TrainConfig(), genotype=genotype, layers=layers, init_channels=channels, stem=stem)
    net = build_network(network_config(config, INFO["mnist-embedded"])).train()
    with torch.no_grad():
        margins = interval_margins(net, x, y, PROBE_EPS).ibp
        width = (net(x).gather(1, y[:, None]) - net(x)) - margins  # clean margin minus its lower bound
    return (width.mean() / PROBE_EPS).item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "width_gain.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    x, y = _digits()
    op_rows = [{"operation": name, "gain": statistics.median(operation_gain(name, x, s) for s in range(args.seeds))}
               for name in PRIMITIVES]
    op_rows.sort(key=lambda row: row["gain"])
    net_rows = []
    for genotype in NAMED:
        row = {"cell": genotype}
        for layers, channels, stem in NETWORKS:
            gains = [network_gain(genotype, layers, channels, stem, x, y, s) for s in range(args.seeds)]
            row[f"{layers}x{channels}{'s' if stem == 'strided' else ''}"] = statistics.median(gains)
        net_rows.append(row)
    print(f"IBP width gain at eps {PROBE_EPS:g}, untrained, training-mode batch norm, median of {args.seeds} seeds")
    print_table(op_rows, [("operation", "operation", ""), ("gain", "gain", ".3g")])
    columns = [key for key in net_rows[0] if key != "cell"]
    print("margin width / eps by network (cells x channels, s: strided stem)")
    print_table(net_rows, [("cell", "cell", "")] + [(key, key, ".2g") for key in columns])
    write_json(args.out, {"benchmark": "width_gain", "probe_eps": PROBE_EPS, "seeds": args.seeds,
                          "operations": op_rows, "networks": net_rows, "environment": environment()})
    return {"operations": op_rows, "networks": net_rows}


if __name__ == "__main__":
    main()
