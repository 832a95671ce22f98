"""Cost of each method's margin lower bound on a DARTS supernet, as a ratio to plain training.

Measured side by side in one run (the methods take turns): forward + backward of
``margin_lower_bound(...).mean()`` against forward + backward of the cross-entropy loss, on a
supernet with every operation on every edge (default: 5 cells, 8 channels, 28x28 inputs,
batch 16, training mode as during search). Memory is reported as the bytes autograd saves for the
backward pass (and the CUDA peak on a GPU). At batch 32 one CROWN-IBP margin bound alone peaked at
20 GB resident on the 24 GB development machine and the interleaved run was killed for memory,
hence batch 16 by default (``--batch 32`` on a larger machine).

    python -m benchmarks.bench_bounds [--device cuda] [--repeats 5]

Targets (issue 2): ibp <= 2x, crown-ibp <= 6x.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import environment, interleaved_medians, print_table, saved_tensor_bytes, write_json
from certnas.space.supernet import SearchNetwork
from verifiers.bounds import margin_lower_bound

TARGETS = {"ibp": 2.0, "crown-ibp": 6.0}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=5)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eps", type=float, default=2 / 255)
    parser.add_argument("--methods", default="ibp,crown-ibp")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_bounds.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = SearchNetwork(C=args.channels, num_classes=10, layers=args.cells, in_channels=1).to(device).train()
    x = torch.rand(args.batch, 1, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    def plain():
        net.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    def bound(method):
        def run():
            net.zero_grad(set_to_none=True)
            loss = -margin_lower_bound(net, x, y, args.eps, method=method).mean()
            loss.backward()
            return loss
        return run

    tasks = {"plain": plain, **{m: bound(m) for m in methods}}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    medians = interleaved_medians(tasks, args.repeats, args.warmup, sync)
    memory = {"plain": saved_tensor_bytes(lambda: F.cross_entropy(net(x), y))}
    for m in methods:
        memory[m] = saved_tensor_bytes(lambda m=m: margin_lower_bound(net, x, y, args.eps, method=m))
    cuda_peak = {}
    if device.type == "cuda":
        for name, task in tasks.items():
            torch.cuda.reset_peak_memory_stats()
            task()
            cuda_peak[name] = torch.cuda.max_memory_allocated()
    rows = []
    for name in tasks:
        ratio = medians[name] / medians["plain"]
        rows.append({"method": name, "seconds": round(medians[name], 4), "ratio": round(ratio, 2),
                     "target": TARGETS.get(name), "saved_MiB": round(memory[name] / 2**20, 1),
                     "cuda_peak_MiB": round(cuda_peak[name] / 2**20, 1) if cuda_peak else None})
    print(f"supernet: {args.cells} cells, {args.channels} channels, {args.size}x{args.size}, batch {args.batch}, "
          f"eps {args.eps:.4g}, device {device}, {args.repeats} interleaved repeats (median)")
    print_table(rows, [("method", "method", ""), ("seconds", "seconds", ".3f"), ("ratio", "x plain", ".2f"),
                       ("target", "target", "g"), ("saved_MiB", "saved MiB", ".1f")])
    record = {"benchmark": "bench_bounds", "settings": vars(args) | {"out": str(args.out)}, "rows": rows,
              "environment": environment()}
    write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
