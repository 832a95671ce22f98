"""Where full CROWN spends its time on one network: seconds per intermediate node (the node, the form
of the specification it starts from, how many of its neurons are back-substituted), the total, and
the peak resident memory, for one margin bound of one test sample, on auto_LiRPA (``engine="lirpa"``; the
tape engine is timed by ``benchmarks.bench_radius``).

    python -m benchmarks.crown_profile MODEL.pt [--eps 0.005] [--max-rows 2048] [--sample 0] [--batch 1]
        [--device cuda]

``--max-rows 0`` switches off the piecewise back-substitution (verifiers.lirpa patch 20). Writes
``--out`` (JSON) and prints the slowest nodes.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.common import environment, print_table, write_json
from certnas.data import load_data
from certnas.errors import CertnasError
from certnas.io import load_model_with_meta
from verifiers import bounds, lirpa


def _spec(C) -> str:
    shape = tuple(getattr(C, "shape", ()) or ())
    return f"{type(C).__name__}{shape}"


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--eps", type=float, default=0.005)
    parser.add_argument("--max-rows", type=int, default=bounds.MAX_CROWN_ROWS)
    parser.add_argument("--sample", type=int, default=0)
    parser.add_argument("--data", default="mnist-embedded")
    parser.add_argument("--batch", type=int, default=1, help="test samples bounded at once (from --sample on)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show", type=int, default=8)
    parser.add_argument("--out", default="crown_profile.json")
    args = parser.parse_args(argv)
    if args.eps <= 0 or args.max_rows < 0 or args.sample < 0 or args.batch < 1:
        parser.error("need --eps > 0, --max-rows >= 0, --sample >= 0 and --batch >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    try:
        model, _ = load_model_with_meta(Path(args.model))
        splits = load_data(args.data, seed=0)
    except CertnasError as error:
        parser.error(str(error))
    if args.sample + args.batch > len(splits.test):
        parser.error(f"--sample {args.sample} --batch {args.batch}: the {args.data} test split has "
                     f"{len(splits.test)} samples")
    pairs = [splits.test[i] for i in range(args.sample, args.sample + args.batch)]
    x = torch.stack([p[0] for p in pairs]).to(args.device)
    y = torch.tensor([int(p[1]) for p in pairs], device=args.device)
    model = model.to(args.device).eval()
    try:
        with torch.no_grad():
            model(x[:1])
    except RuntimeError as error:
        parser.error(f"the model does not take {args.data} inputs of shape {tuple(x.shape[1:])}: "
                     f"{str(error).splitlines()[0]}")
    cuda = x.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    nodes: List[Dict] = []
    original = lirpa.BoundedModule.backward_general

    def timed(self, C, node=None, *rest, **kwargs):
        sync()
        start = time.perf_counter()
        result = original(self, C, node, *rest, **kwargs)
        sync()
        if node is not None and node.name != self.final_name:
            rows = kwargs.get("unstable_size")
            nodes.append({"node": node.name, "kind": type(node).__name__, "start": _spec(C),
                          "rows": None if rows in (None, 0) or rows == float("inf") else int(rows),
                          "shape": "x".join(str(d) for d in node.output_shape[1:]),
                          "seconds": time.perf_counter() - start})
        return result

    previous_rows = bounds.MAX_CROWN_ROWS
    lirpa.BoundedModule.backward_general = timed
    bounds.MAX_CROWN_ROWS = args.max_rows
    try:
        start = time.perf_counter()
        with torch.no_grad():
            margin = bounds.margin_lower_bound(model, x, y, args.eps, method="crown", engine="lirpa")
        sync()
        total = time.perf_counter() - start
    finally:
        lirpa.BoundedModule.backward_general = original
        bounds.MAX_CROWN_ROWS = previous_rows
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mib = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None
    margins = margin.flatten().tolist()
    print(f"CROWN margin bound {' '.join(f'{m:.4f}' for m in margins[:4])}{' ...' if len(margins) > 4 else ''} at eps "
          f"{args.eps:g}, {args.batch} sample(s) on {args.device}: {total:.1f} s, {len(nodes)} intermediate nodes, "
          f"peak resident {peak_mib:.0f} MiB{f', GPU peak {gpu_mib:.0f} MiB' if cuda else ''}, "
          f"{torch.get_num_threads()} threads, max rows {args.max_rows}")
    print_table(sorted(nodes, key=lambda n: -n["seconds"])[:args.show],
                [("node", "node", "s"), ("kind", "kind", "s"), ("shape", "shape", "s"), ("rows", "rows", "d"),
                 ("seconds", "seconds", ".2f")])
    result = {"margin": margins[0], "margins": margins, "seconds": total, "peak_MiB": peak_mib,
              "gpu_peak_MiB": gpu_mib, "nodes": nodes,
              "settings": vars(args), "environment": environment()}
    write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
