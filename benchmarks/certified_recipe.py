"""What each part of the default certified-training recipe is worth: ``certnas train --mode ibp`` with
DARTS' global-average-pooling head (the former default) and variants that each change one thing, among
them the grid heads (``head grid 7`` is today's default network), trained and evaluated identically.

    python -m benchmarks.certified_recipe [--variants "GAP head (the former default),no regulariser,..."]

Every variant trains on the embedded digits and reports clean and IBP / CROWN-IBP verified accuracy at
L-inf 0.1 on the 1,000 test digits (``verifiers.interval``; ``certnas verify`` checks the default models
with auto_LiRPA and the PGD guard), wall time and the thread count. Records go to
``results/certified_recipe.json``, one per variant, and a finished variant is not trained again
(``--force`` retrains). Each run takes about 11 minutes on the 2-core machine at 2 threads; the
committed results ran two at a time at 1 thread each (about 20-30 minutes each).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks.common import environment, print_table, write_json
from certnas.config import upgrade_saved
from certnas.train import TrainConfig, train

VARIANTS = {
    "GAP head (the former default)": {},
    "no regulariser": {"reg_weight": 0.0},
    "ratio regulariser (Shi et al.)": {"reg_form": "ratio"},
    "default initialisation": {"init": "standard"},
    "linear eps ramp": {"eps_schedule": "linear"},
    "Adam lr 5e-4": {"lr": 5e-4},
    "SGD lr 0.025": {"optimizer": "sgd"},
    "kappa_end 0.5": {"kappa_end": 0.5},
    "no weight decay": {"weight_decay": 0.0},
    "batch 32": {"batch_size": 32},
    "cifar stem (28x28 cells)": {"stem": "cifar"},
    "3 cells, cifar stem": {"layers": 3, "stem": "cifar", "init_channels": 8},
    "crown-ibp": {"mode": "crown-ibp"},
    "head grid 2": {"head_grid": 2},
    "head grid 7": {"head_grid": 7},
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="GAP head (the former default),no regulariser,ratio regulariser "
                                              "(Shi et al.),default initialisation,linear eps ramp,Adam lr 5e-4,"
                                              "head grid 2,head grid 7")
    parser.add_argument("--epochs", type=int, default=None, help="Override the epochs of every variant.")
    parser.add_argument("--runs", type=Path, default=Path("runs/certified_recipe"), help="Run folders.")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "certified_recipe.json")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    records = json.loads(args.out.read_text())["records"] if args.out.is_file() else {}
    # the ablations were measured on the former default network, whose classifier reads global average
    # pooling (DARTS' head); the head variants change only that (head grid 7 is today's default)
    base = TrainConfig(mode="ibp", head_grid=1)
    for name in names:
        config = replace(base, **VARIANTS[name], **({"epochs": args.epochs} if args.epochs else {}))
        done = name in records and json.loads(json.dumps(upgrade_saved(TrainConfig, records[name]["settings"]))) \
            == json.loads(json.dumps(asdict(config)))  # settings added since a record was made: their defaults
        if done and not args.force:
            continue
        began = time.time()
        folder = args.runs / name.replace(" ", "_").replace("(", "").replace(")", "").replace(".", "")
        summary = train(config, folder, force=True, quiet=True)
        records[name] = {"variant": name, "clean": summary["test_acc"], "ibp": summary["test_ibp_verified"],
                         "crown-ibp": summary["test_crown-ibp_verified"], "seconds": round(time.time() - began),
                         "threads": torch.get_num_threads(), "parameters": summary["parameters"],
                         "settings": json.loads(json.dumps(asdict(config)))}
        # re-read first: variants may run in parallel processes writing the same file
        stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
        records = {**stored.get("records", {}), name: records[name]}
        write_json(args.out, {**stored, "benchmark": "certified_recipe", "records": records,
                              "environment": environment()})
        print(f"{name}: clean {summary['test_acc']:.3f}, ibp {summary['test_ibp_verified']:.3f}, "
              f"crown-ibp {summary['test_crown-ibp_verified']:.3f} ({records[name]['seconds']} s)", flush=True)
    rows = [records[name] for name in names if name in records]
    print_table(rows, [("variant", "variant", ""), ("clean", "clean", ".3f"), ("ibp", "ibp verified", ".3f"),
                       ("crown-ibp", "crown-ibp verified", ".3f"), ("seconds", "seconds", "d"), ("threads", "threads", "d")])
    return {"rows": rows}


if __name__ == "__main__":
    main()
