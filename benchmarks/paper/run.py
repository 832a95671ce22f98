"""``python -m benchmarks.paper``: the command line that runs the pipeline and writes the tables."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.paper.figures import figures
from benchmarks.paper.pipeline import Pipeline
from benchmarks.paper.scales import ROWS, SCALES, TABLES
from benchmarks.paper.tables import (certified_table, clean_table, cost_table, game_table, imagenet_table, write_skipped,
                                     write_table)
from certnas.files import atomic_write_json, atomic_write_text, environment

DESCRIPTION = "Regenerate the DSRNA paper's tables: search -> train -> attack -> verify for every row and seed."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper", description=DESCRIPTION)
    parser.add_argument("--table", default="all", help=f"all or one of: {', '.join(TABLES)}")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", default="all", help=f"all or a comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<scale>")
    parser.add_argument("--crown-n", type=int, default=None,
                        help="test samples with a full-CROWN radius (the first of the verify samples; default: the "
                             "scale's, 2 at cpu scale, about a minute per sample and norm on 2 cores); 0: none")
    parser.add_argument("--crown-device", default=None,
                        help="device of the full-CROWN stage only (default: --device), e.g. cuda to add the CROWN "
                             "column to tables whose other stages ran on a CPU")
    parser.add_argument("--crown-seeds", type=int, default=None,
                        help="the CROWN column for the first this many seeds only (default: every seed)")
    parser.add_argument("--crown-cached-only", action="store_true",
                        help="the CROWN column from the stages already cached (n/a elsewhere), e.g. after a GPU run "
                             "that did not finish; nothing is computed for it")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.crown_n is not None and args.crown_n < 0:
        parser.error(f"--crown-n must be >= 0, got {args.crown_n}")
    if args.crown_seeds is not None and args.crown_seeds < 1:
        parser.error(f"--crown-seeds must be >= 1, got {args.crown_seeds}")
    from certnas.cli import _check_device
    from certnas.config import ConfigError
    for flag, device in (("--device", args.device), ("--crown-device", args.crown_device)):
        try:  # a cached-only CROWN column never runs on its device: the name need only parse
            if device is not None and not (flag == "--crown-device" and args.crown_cached_only):
                _check_device(device)
            elif device is not None:
                torch.device(device)
        except (ConfigError, RuntimeError) as error:
            parser.error(f"{flag} {device!r}: {str(error).splitlines()[0]}")
    if args.table != "all" and args.table not in TABLES:
        parser.error(f"unknown table {args.table!r}; known: all, {', '.join(TABLES)}")
    rows = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    scale = SCALES[args.scale]
    if args.crown_n is not None:
        if args.crown_n > scale.verify_n:
            parser.error(f"--crown-n {args.crown_n} is more than the scale's {scale.verify_n} verify samples")
        scale = dataclasses.replace(scale, crown_n=args.crown_n)
    out = args.out or Path(__file__).parents[1] / "results" / scale.name
    pipeline = Pipeline(scale, out, args.data_root, args.device, quiet=not args.verbose,
                        crown_device=args.crown_device, crown_seeds=args.crown_seeds,
                        crown_cached_only=args.crown_cached_only)
    crown_seeds = min(args.seeds, args.crown_seeds or args.seeds)
    tables = list(TABLES) if args.table == "all" else [args.table]
    datasets = {"mnist": pipeline.available(scale.mnist), "cifar10": pipeline.available("cifar10")}
    transfer = None
    if "imagenet" in tables:  # the CIFAR-10 cell, trained on ImageNet
        transfer = pipeline.available("imagenet") or (datasets["cifar10"] and
                                                      f"the transferred cell is searched on CIFAR-10: {datasets['cifar10']}")
    wanted = ({"mnist"} if set(tables) <= {"game-mnist"} else set() if tables == ["imagenet"]
              else {"cifar10"} if tables == ["game-cifar10"] else {"mnist", "cifar10"})
    atomic_write_json(out / "run.json", {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.paper", *sys.argv[1:]])
                                         if argv is None else "benchmarks.paper " + " ".join(argv),
                                         "scale": asdict(scale), "seeds": args.seeds, "rows": rows,
                                         **({"crown_seeds": crown_seeds, "crown_device": pipeline.crown_device,
                                             "crown_cached_only": args.crown_cached_only} if scale.crown_n else {}),
                                         "datasets": {**{k: v or "available" for k, v in datasets.items()},
                                                      **({"imagenet": transfer or "available"} if "imagenet" in tables else {})},
                                         "versions": environment()})
    records: List[Dict] = []
    records_path = out / "records.jsonl"
    from tqdm import tqdm
    jobs = [(seed, dataset, row) for seed in range(args.seeds) for dataset in ("mnist", "cifar10")
            if dataset in wanted and datasets[dataset] is None for row in rows]
    jobs += [(seed, "imagenet", row) for seed in range(args.seeds) for row in rows if "imagenet" in tables and not transfer]
    for seed, dataset, row in tqdm(jobs, desc="paper", dynamic_ncols=True):
        records.append(pipeline.transfer(row, seed) if dataset == "imagenet" else
                       pipeline.record(row, dataset, seed, attacks=any(t.startswith("game") for t in tables)))
        atomic_write_text(records_path, "".join(json.dumps(r) + "\n" for r in records))
    note = (f"Scale `{scale.name}`; {args.seeds} seed(s); mean ± std over seeds (sample std). Values in the "
            f"'reported by others' columns come from benchmarks/paper/reported.md (the paper's setting, not ours).")
    for dataset in ("mnist", "cifar10"):
        reason = datasets[dataset]
        title_data = "MNIST" if dataset == "mnist" else "CIFAR-10"
        eps = scale.eps[dataset]
        if f"game-{dataset}" in tables:
            if reason:
                write_skipped(out, f"game_{dataset}", f"Game-based evaluation, {title_data}", reason)
            else:
                write_table(game_table(records, dataset), out, f"game_{dataset}", f"Game-based evaluation, {title_data}",
                            note + f" Robust accuracy (%) on {scale.attack_n} test samples: FGSM, PGD-{scale.attack_steps}"
                            f" and C&W-loss PGD-{scale.attack_steps} at L-inf eps {eps['inf']:g}; AutoAttack "
                            f"({scale.autoattack_version}) at L2 eps {eps['2']:g}; pixels in [0, 1].")
        if reason:
            for name in ("clean", "certified", "search-cost"):
                if name in tables:
                    write_skipped(out, f"{name.replace('-', '_')}_{dataset}", f"{name}, {title_data}", reason)
            continue
        if "clean" in tables:
            write_table(clean_table(records, dataset), out, f"clean_{dataset}", f"Clean accuracy, {title_data}", note)
        if "certified" in tables:
            write_table(certified_table(records, dataset, out), out, f"certified_{dataset}",
                        f"Certified lower bounds, {title_data}",
                        note + f" Certified radius per sample (IBP, CROWN-IBP: bisection, {scale.radius_steps} steps, "
                        f"{scale.verify_n} test samples; "
                        + (f"full CROWN on the first {scale.crown_n} of them, by a root search within 1% of the "
                           f"smallest eps a CROWN pass failed at (verifiers.radius.crown_radius)"
                           + (f", seed{'s' if crown_seeds > 1 else ''} 0{f'-{crown_seeds - 1}' if crown_seeds > 1 else ''} only"
                              if crown_seeds < args.seeds else "")
                           + ("; only where its stage finished, n/a elsewhere" if args.crown_cached_only else "")
                           + "), " if scale.crown_n else
                           "full CROWN not run: n/a, see --crown-n), ")
                        + "mean / median. The PGD radius is an upper bound. Verified accuracy "
                        "is the share of samples whose best certified radius reaches the eps; the CROWN column's, "
                        "of the CROWN samples whose CROWN radius reaches its own, smaller eps (at the table's eps "
                        "CROWN certifies none of these standard-trained networks).")
            figures(records, out, dataset)
        if "search-cost" in tables:
            write_table(cost_table(records, dataset), out, f"search_cost_{dataset}", f"Search cost, {title_data}",
                        note + " Wall-clock seconds of the search on this machine; the ratio is to DARTS on the same "
                        "machine. The reported GPU-days are the paper's, on a GTX 1080Ti at the paper's scale.")
    if "imagenet" in tables:
        if transfer:
            write_skipped(out, "imagenet", "ImageNet transfer", transfer)
        else:
            size = scale.imagenet["image_size"]
            evaluated = next((r["test_samples"] for r in records if r["dataset"] == "imagenet"), 0)
            write_table(imagenet_table(records, scale), out, "imagenet", "ImageNet transfer",
                        note + f" Each row's CIFAR-10 cell (same seed) trained with standard training on ImageNet at "
                        f"{size}x{size} pixels ({', '.join(f'{k} {v}' for k, v in {**scale.train, **scale.imagenet['train']}.items())}"
                        f"); top-1 / top-5 on the first {evaluated} "
                        f"validation images; FGSM and PGD-{scale.attack_steps} robust accuracy at L-inf eps "
                        f"{scale.imagenet['eps']:.4g} (pixels in [0, 1]) on {scale.attack_n} of them.")
    print(f"tables written to {out}")
    return 0
