"""Steps per second of data-parallel training (certnas.distributed) with 1 and 2 gloo processes at the
same global batch, launched by torchrun side by side in one run; the ratio is the scale-out speed-up.

    python -m benchmarks.bench_distributed [--steps 20] [--batch-size 64] [--mode ibp] [--device cpu]

Each configuration runs ``--warmup`` steps, then times ``--steps`` steps of ``Trainer.step`` on the
default network (rank 0's wall clock, after a barrier). Rows: 1 process with 1 thread, 1 process with
2 threads, 2 processes with 1 thread each. On a 2-core machine 2 processes cannot beat 1 process using
both cores; the point is the overhead of the all-reduces and the synchronised batch norm.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment, print_table, write_json


def _worker(args) -> None:
    """One rank of a timed run (inside torchrun): write rank 0's seconds per step to ``args.result``."""
    from certnas.data import INFO, load_data
    from certnas.distributed import finish, world_from_environment
    from certnas.runs import collate, seed_everything
    from certnas.train import Trainer, TrainConfig, network_config, schedule
    world = world_from_environment(args.device)
    seed_everything(0)
    config = TrainConfig(mode=args.mode, batch_size=args.batch_size, device=args.device, max_loss=0).resolved()
    trainer = Trainer(config, network_config(config, INFO["mnist-embedded"]), world)
    data = load_data("mnist-embedded").train
    plan = schedule(config, 10 ** 6, 10)  # after the ramp: the full certified loss
    batches = [torch.arange(i * args.batch_size, (i + 1) * args.batch_size) % len(data)
               for i in range(args.warmup + args.steps)]
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    for step, index in enumerate(batches):
        if step == args.warmup:
            sync()
            world.barrier()
            start = time.perf_counter()
        x, y = collate(data, world.shard(index), trainer.device)
        trainer.step(x, y, plan, world.share(index))
    sync()
    world.barrier()
    seconds = (time.perf_counter() - start) / args.steps
    if world.main:
        Path(args.result).write_text(json.dumps({"seconds_per_step": seconds}))
    finish(world)


def _launch(ranks: int, threads: int, args, result: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CERTNAS_BENCH_WORKER": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "benchmarks.bench_distributed", "--", "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--mode", args.mode, "--device", args.device,
               "--result", str(result)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_distributed: the {ranks}-process run failed:\n{done.stderr[-2000:]}")
    return json.loads(result.read_text())["seconds_per_step"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mode", default="ibp")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_distributed.json")
    args = parser.parse_args(argv)
    if os.environ.get("CERTNAS_BENCH_WORKER"):
        _worker(args)
        return {}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for ranks, threads in ((1, 1), (1, 2), (2, 1)):
            seconds = _launch(ranks, threads, args, Path(folder) / f"{ranks}-{threads}.json")
            rows.append({"what": f"{ranks} process{'es' if ranks > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}",
                         "ranks": ranks, "threads": threads, "seconds_per_step": round(seconds, 4),
                         "steps_per_s": round(1 / seconds, 3)})
    base = rows[0]["seconds_per_step"]
    for row in rows:
        row["speedup_vs_1x1"] = round(base / row["seconds_per_step"], 3)
    print(f"data-parallel {args.mode} training step, global batch {args.batch_size}, {args.steps} timed steps, "
          f"device {args.device}, {'gloo' if args.device == 'cpu' else 'nccl'}")
    print_table(rows, [("what", "what", ""), ("seconds_per_step", "s/step", ".4f"), ("steps_per_s", "steps/s", ".3f"),
                       ("speedup_vs_1x1", "x 1x1", ".2f")])
    write_json(args.out, {"benchmark": "bench_distributed", "settings": {k: str(v) for k, v in vars(args).items()},
                          "rows": rows, "environment": environment()})
    return {"rows": rows}


if __name__ == "__main__":
    main()
