"""Does the default search settle? ``certnas search`` at several seeds, read against issue 13's criteria.

    python -m benchmarks.search_seeds                                   # the defaults, seeds 0, 1, 2
    python -m benchmarks.search_seeds --set a_lr_schedule=constant --label "constant a_lr"

Per run, from its history.csv: the last epoch's mean margin bound (criterion: finite and > -100) and the
share of validation samples it certifies, the final architecture entropy (criterion: <= 75% of ln 8) and,
per searched cell type, how many of the cell's edges the genotypes of the last two epochs share
(criterion: >= 6 of 8). Runs live in ``--work``/<label>-s<seed>: a finished one is read again, an
interrupted one resumes, one made with other settings is refused (exit 2). Records replace those of the
same label and seed in ``--out`` (JSON), and a Markdown table beside it lists every record.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.common import environment, write_json
from certnas.config import ConfigError, from_dict
from certnas.files import atomic_write_text
from certnas.runs import changed_settings
from certnas.search import SearchConfig, search

ENTROPY_SHARE = 0.75  # of ln(number of operations)
EDGES_AGREEING = 6  # of 8


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def read_run(folder: Path) -> Dict[str, Any]:
    """The criteria of one finished search folder (its history.csv and genotype.json)."""
    rows = list(csv.DictReader(open(folder / "history.csv")))
    record = json.loads((folder / "genotype.json").read_text())
    last = rows[-1]
    operations = len(record["arch_weights"]["normal"][0])
    entropy = float(last["arch_entropy"])
    genotypes = [json.loads(row["genotype"]) for row in rows[-2:]]
    agreement = {cell: sum(a == b for a, b in zip(genotypes[0][cell], genotypes[-1][cell]))
                 for cell in record["searched_cells"]}
    edges = {cell: len(genotypes[-1][cell]) for cell in record["searched_cells"]}
    margin = float(last["clb_margin"]) if "clb_margin" in last else None
    return {
        "epochs": len(rows), "search_seconds": round(sum(float(row["seconds"]) for row in rows), 1),
        "last_clb_margin": margin, "last_clb_certified": float(last["clb_certified"]) if "clb_certified" in last else None,
        "margin_criterion_met": margin is not None and math.isfinite(margin) and margin > -100,
        "entropy_per_epoch": [float(row["arch_entropy"]) for row in rows],
        "final_entropy_share": round(entropy / math.log(operations), 4),
        "entropy_criterion_met": entropy <= ENTROPY_SHARE * math.log(operations),
        "edges_agreeing_last_two": agreement, "edges": edges,
        "agreement_criterion_met": all(agreement[cell] >= EDGES_AGREEING * edges[cell] / 8 for cell in agreement),
        "a_lr_per_epoch": [float(row["a_lr"]) for row in rows] if "a_lr" in last else None,
        "normal_cell": [op for op, _ in record["normal"]],
    }


def markdown(records: List[Dict[str, Any]]) -> str:
    lines = ["| settings | seed | margin | certified | final entropy (share of ln K) | last two genotypes agree | "
             "search seconds |", "|---|---|---|---|---|---|---|"]
    for r in records:
        agree = ", ".join(f"{cell} {n}/{r['edges'][cell]}" for cell, n in r["edges_agreeing_last_two"].items())
        margin = "" if r["last_clb_margin"] is None else f"{r['last_clb_margin']:.3f}"
        certified = "" if r["last_clb_certified"] is None else f"{100 * r['last_clb_certified']:.1f}%"
        lines.append(f"| {r['label']} | {r['seed']} | {margin} | {certified} | "
                     f"{r['entropy_per_epoch'][-1]:.3f} ({100 * r['final_entropy_share']:.1f}%) | {agree} | "
                     f"{r['search_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a SearchConfig setting over the defaults (repeatable), e.g. a_lr=0.2")
    parser.add_argument("--label", default=None, help="the records' name (default: the --set changes, or 'defaults')")
    parser.add_argument("--work", type=Path, default=Path("runs/search_seeds"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_seeds.json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        changes = {}
        for item in args.set:
            name, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected NAME=VALUE")
            changes[name.strip()] = _value(text.strip())
        base = from_dict(SearchConfig, changes).validate()
    except (ValueError, ConfigError) as error:
        parser.exit(2, f"search_seeds: {error}\n")
    label = args.label or (", ".join(args.set) if args.set else "defaults")
    slug = re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in label)).strip("-") or "run"
    records = []
    for seed in seeds:
        folder, config = args.work / f"{slug}-s{seed}", replace(base, seed=seed)
        changed = changed_settings(folder, config)  # a folder of this label made with other settings is not reused
        if changed:
            parser.exit(2, f"search_seeds: {folder} holds a run with other settings ({', '.join(changed)}); "
                           "give another --label or --work\n")
        if not (folder / "genotype.json").is_file():
            search(config, folder, resume=(folder / "checkpoint.pt").is_file(), quiet=args.quiet)
        records.append({"label": label, "seed": seed, "settings": changes, **read_run(folder)})
        print(markdown(records[-1:]).splitlines()[-1])
    kept = []
    if args.out.is_file():
        done = {(r["label"], r["seed"]) for r in records}
        kept = [r for r in json.loads(args.out.read_text()).get("records", [])
                if "label" in r and (r["label"], r["seed"]) not in done]  # records of this script's form
    everything = kept + records
    write_json(args.out, {"benchmark": "search_seeds", "criteria": {
        "margin": "last epoch's mean clb_margin finite and > -100",
        "entropy": f"final arch_entropy <= {ENTROPY_SHARE} ln K", "agreement": f">= {EDGES_AGREEING} of 8 edges per cell"},
        "records": everything, "environment": environment()})
    atomic_write_text(args.out.with_suffix(".md"), markdown(everything))
    return {"records": records}


if __name__ == "__main__":
    main()
