"""Time and peak memory of one training step per mode, as a ratio to ``standard``, measured side by
side in one run on the same network and batches (an epoch is a fixed number of such steps, so the
ratio is the per-epoch ratio).

    python -m benchmarks.bench_train [--device cuda] [--repeats 5] [--threads 2] [--cnn small]

The network: the default DARTS network of ``certnas train`` (batch norm), or with ``--cnn`` a plain ReLU CNN
(``--network cnn``; the full-MNIST networks). The robust modes are timed at full eps (after the ramp, no
warm-up regulariser, clean-loss weight 0: a network without batch norm skips the clean forward pass there). ``crown-ibp`` is
beta = 1 with the default ``--crown-rows``; ``crown-ibp (all rows)`` back-substitutes every margin
row; ``crown-ibp (ramp)`` mixes CROWN-IBP and IBP (beta = 0.5); ``ibp (clean pass kept)`` gives the clean loss a
weight of 1e-9, which keeps the clean forward pass (the step before the pass was skipped at weight 0). ``ibp (auto_LiRPA)`` is the same
loss with auto_LiRPA's bounds, the engine certified training used before ``verifiers.interval``.
Peak memory: a fresh process per mode builds the network, resets the kernel's peak-resident counter
(importing torch's CUDA build alone peaks near 3 GB) and runs two steps; the table gives the resident
set before the steps and its peak during them (the whole process: Python, torch and the network).
Targets (issue 41): ibp <= 2x, crown-ibp <= 3x (issue 11's were 2.5x and 6x), peak memory <= 4 GB at batch 64.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from benchmarks.common import environment, interleaved_medians, print_table, write_json
from certnas.data import INFO
from certnas.config import ConfigError
from certnas.train import Trainer, TrainConfig, certified_margins, cnn_layers, network_config

FULL = {"eps": 0.1, "kappa": 0.0, "beta": 0.0, "progress": 1.0}
VARIANTS = {
    "standard": ({"mode": "standard"}, {"eps": 0.0, "kappa": 1.0, "beta": 1.0, "progress": 0.0}),
    "pgd (7 steps)": ({"mode": "pgd"}, {**FULL, "kappa": 1.0}),
    "ibp": ({"mode": "ibp"}, FULL),
    "ibp (clean pass kept)": ({"mode": "ibp"}, {**FULL, "kappa": 1e-9}),
    "ibp (auto_LiRPA)": ({"mode": "ibp"}, FULL),
    "crown-ibp": ({"mode": "crown-ibp"}, {**FULL, "beta": 1.0}),
    "crown-ibp (all rows)": ({"mode": "crown-ibp", "crown_rows": 0}, {**FULL, "beta": 1.0}),
    "crown-ibp (ramp)": ({"mode": "crown-ibp"}, {**FULL, "eps": 0.05, "kappa": 0.5, "beta": 0.5, "progress": 0.5}),
}
TARGETS = {"ibp": 2.0, "crown-ibp": 3.0}
MEMORY_TARGET_MB = 4096


def _auto_lirpa_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, plan: Dict[str, float]) -> None:
    """One ibp step whose margins come from auto_LiRPA (verifiers.bounds) instead of verifiers.interval."""
    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    logits = trainer.model(x)
    margins = certified_margins(trainer.model, x, y, plan["eps"], "inf", "ibp", 0.0)
    loss = plan["kappa"] * F.cross_entropy(logits, y) + (1 - plan["kappa"]) * F.cross_entropy(-margins, y)
    loss.backward()
    trainer.optimizer.step()


def _task(name: str, base: TrainConfig, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    change, plan = VARIANTS[name]
    torch.manual_seed(0)
    config = replace(base, **change)
    trainer = Trainer(config, network_config(config, INFO["mnist-embedded"]))
    if name == "ibp (auto_LiRPA)":
        return lambda: _auto_lirpa_step(trainer, x, y, plan)
    return lambda: trainer.step(x, y, plan)


def _batch(batch_size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(batch_size, 1, 28, 28, generator=g).to(device),
            torch.randint(0, 10, (batch_size,), generator=g).to(device))


def _resident_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_memory_child(name: str, base: TrainConfig, batch_size: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    x, y = _batch(batch_size, torch.device(base.device))
    task = _task(name, base, x, y)
    before = _resident_mib("VmRSS")
    try:  # reset the peak to the current resident set (Linux): importing torch's CUDA build peaks high
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    for _ in range(2):
        task()
    queue.put((before, _resident_mib("VmHWM")))


def peak_memory_mb(name: str, base: TrainConfig, batch_size: int, threads: int) -> Tuple[float, float]:
    """(resident MiB before the steps, peak resident MiB during two steps of ``name``) of a fresh process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_memory_child, args=(name, base, batch_size, threads, queue))
    process.start()
    before, peak = queue.get(timeout=1800)
    process.join()
    return round(before, 1), round(peak, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--layers", type=int, default=TrainConfig.layers)
    parser.add_argument("--init-channels", type=int, default=TrainConfig.init_channels)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--genotype", default=TrainConfig.genotype)
    parser.add_argument("--cnn", default=None, help="time a plain CNN (--network cnn --cnn SPEC, e.g. small) "
                                                    "instead of the DARTS network")
    parser.add_argument("--no-memory", action="store_true", help="Skip the per-mode peak-memory processes.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_train.json")
    args = parser.parse_args(argv)
    if args.cnn:
        try:
            cnn_layers(args.cnn)
        except ConfigError as error:
            parser.error(str(error))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    base = TrainConfig(layers=args.layers, init_channels=args.init_channels, batch_size=args.batch_size,
                       genotype=args.genotype, device=args.device, max_loss=0,
                       **({"network": "cnn", "cnn": args.cnn} if args.cnn else {}))
    device = torch.device(args.device)
    x, y = _batch(args.batch_size, device)
    tasks = {name: _task(name, base, x, y) for name in VARIANTS}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    medians = interleaved_medians(tasks, args.repeats, args.warmup, sync)
    rows = []
    for name, seconds in medians.items():
        row = {"mode": name, "seconds": round(seconds, 4), "ratio": round(seconds / medians["standard"], 2),
               "target": TARGETS.get(name)}
        if not args.no_memory:
            row["before_MiB"], row["peak_MiB"] = peak_memory_mb(name, base, args.batch_size, args.threads)
        rows.append(row)
    network = f"cnn {args.cnn}" if args.cnn else f"{args.genotype}, {args.layers} cells, {args.init_channels} channels"
    print(f"training step: {network}, batch "
          f"{args.batch_size}, device {device}, {args.threads} threads, {args.repeats} interleaved repeats (median); "
          f"crown-ibp rows {base.crown_rows or 'all'}")
    print_table(rows, [("mode", "mode", ""), ("seconds", "seconds", ".3f"), ("ratio", "x standard", ".2f"),
                       ("target", "target", "g"), ("before_MiB", "MiB before", ".0f"),
                       ("peak_MiB", "peak MiB", ".0f")])
    write_json(args.out, {"benchmark": "bench_train", "settings": {k: str(v) for k, v in vars(args).items()},
                          "rows": rows, "memory_target_MiB": MEMORY_TARGET_MB, "environment": environment()})
    return {"rows": rows}


if __name__ == "__main__":
    main()
