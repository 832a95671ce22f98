"""A searched cell against hand-designed networks of about its size, all trained by one recipe on full MNIST
(issue 41, item 3).

    python -m benchmarks.same_recipe --data-root DIR --seeds 0,1 --out benchmarks/results/full-mnist/same-recipe
    python -m benchmarks.same_recipe --out benchmarks/results/full-mnist/same-recipe --summarise

Every network is trained by ``certnas train`` with the same settings (``RECIPE``: certnas' IBP defaults, 20
epochs with eps ramped to ``--eps`` over 10, on 10,000 fresh training digits per epoch) and verified at that eps by
``certnas verify --method ibp,crown-ibp`` on every test digit (PGD-50 before the bounds). One ``--out`` folder
holds one eps (a folder trained at another eps is refused). Each stage runs as its own
``certnas`` process; a finished stage is kept, so an interrupted run resumes by rerunning the command. The
summary (``same_recipe.csv`` / ``.md``) has one row per network and seed and a mean row per network; every run's
command, commit and environment is appended to ``runs.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from certnas.config import ConfigError
from certnas.files import atomic_write_json, environment

GENOTYPE = Path(__file__).resolve().parent / "results" / "full-mnist" / "same-recipe" / "search" / "genotype.json"
NETWORKS: Dict[str, Tuple[str, List[str]]] = {
    "cnn": ("hand-designed CNN c16k4s2,c16k4s2,f50", ["--network", "cnn", "--cnn", "c16k4s2,c16k4s2,f50"]),
    "pc-darts": ("PC-DARTS' cell (certnas' default network)", ["--genotype", "PC_DARTS"]),
    "darts-v2": ("DARTS' cell (DARTS_V2)", ["--genotype", "DARTS_V2"]),
    "dsrna-cb": ("DSRNA-CB's cell (certnas search --metric clb)", ["--genotype", "{genotype}"]),
}
RECIPE = ["--mode", "ibp", "--train-limit", "10000"]
COLUMNS = ["network", "seed", "parameters", "train_minutes", "clean", "pgd", "ibp", "crown_ibp", "verified"]


def _certnas(*args: str) -> float:
    """Run one ``certnas`` command; its seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "certnas.cli", "-q", *args], check=True)
    return time.perf_counter() - start


def run_stage(out: Path, name: str, seed: int, data: List[str], genotype: Path, eps: float, n: int,
              extra: List[str]) -> None:
    """Train and verify one network and seed, skipping what is already done."""
    folder = out / f"{name}-seed{seed}"
    train, verify = folder / "train", folder / f"verify-{eps:g}"
    args = [a.replace("{genotype}", str(genotype)) for a in NETWORKS[name][1]]
    trained_at = json.loads((train / "config.json").read_text())["eps"] if (train / "config.json").exists() else eps
    if trained_at != eps:
        raise ConfigError(f"{train} was trained at eps {trained_at:g}, not {eps:g}: use another --out")
    if not (train / "summary.json").exists():
        resume = ["--resume"] if (train / "checkpoint.pt").exists() else []
        _certnas("train", *data, *args, *RECIPE, "--eps", f"{eps:g}", *extra, "--seed", str(seed), "--out", str(train),
                 *resume)
    if not (verify / "verify.json").exists():
        shutil.rmtree(verify, ignore_errors=True)  # an interrupted verify starts again
        seconds = _certnas("verify", str(train / "model.pt"), *data, "--eps", f"{eps:g}", "--n", str(n),
                           "--method", "ibp,crown-ibp", "--out", str(verify))
        atomic_write_json(folder / "verify_seconds.json", {"seconds": round(seconds, 1)})


def record_run(out: Path, record: dict) -> None:
    """Append one run's command and environment to ``out/runs.json``, a list kept across runs (a run never
    overwrites an earlier run's record, whatever its seeds)."""
    path = out / "runs.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    atomic_write_json(path, runs + [record])


def _row(folder: Path, eps: float) -> Optional[dict]:
    summary, verify = folder / "train" / "summary.json", folder / f"verify-{eps:g}" / "verify.csv"
    if not (summary.exists() and verify.exists()):
        return None
    trained = json.loads(summary.read_text())
    results = {r["method"]: r["accuracy"] for r in json.loads((verify.parent / "verify.json").read_text())["results"]}
    with open(verify) as stream:
        rows = list(csv.DictReader(stream))
    samples = {r["index"] for r in rows}
    certified = {r["index"] for r in rows if r["certified"] == "True"}
    name, _, seed = folder.name.rpartition("-seed")
    return {"network": name, "seed": int(seed), "parameters": trained["parameters"],
            "train_minutes": round(trained["train_seconds"] / 60, 1), "clean": results["clean"],
            "pgd": results["pgd-50"], "ibp": results["ibp"], "crown_ibp": results["crown-ibp"],
            "verified": round(len(certified) / len(samples), 4)}


def summarise(out: Path, eps: float) -> List[dict]:
    """One row per finished network and seed, then per network the mean over its seeds: CSV and Markdown."""
    rows = [r for f in sorted(out.iterdir()) if f.is_dir() and "-seed" in f.name for r in [_row(f, eps)] if r]
    order = list(NETWORKS)
    rows.sort(key=lambda r: (order.index(r["network"]) if r["network"] in order else len(order), r["seed"]))
    means = []
    for name in dict.fromkeys(r["network"] for r in rows):
        group = [r for r in rows if r["network"] == name]
        means.append({"network": name, "seed": f"mean of {len(group)}", "parameters": group[0]["parameters"],
                      **{k: round(statistics.mean(r[k] for r in group), 4 if k != "train_minutes" else 1)
                         for k in COLUMNS[3:]}})
    with open(out / "same_recipe.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, COLUMNS)
        writer.writeheader()
        writer.writerows(rows + means)
    percent = COLUMNS[4:]
    lines = [f"Accuracy in % on the test digits at L-inf {eps:g} (verified: certified by IBP or CROWN-IBP).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows + means:
        lines.append("| " + " | ".join(f"{100 * r[k]:.2f}" if k in percent else str(r[k]) for k in COLUMNS) + " |")
    (out / "same_recipe.md").write_text("\n".join(lines) + "\n")
    return rows + means


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="mnist", help="certnas' --data (default: mnist, the full set)")
    parser.add_argument("--data-root", default=None, help="folder of the dataset (certnas data mnist --root DIR)")
    parser.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated, of: " + ", ".join(NETWORKS))
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--genotype", type=Path, default=GENOTYPE, help="the searched cell's genotype.json")
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf eps trained at and verified (default 0.1)")
    parser.add_argument("--n", type=int, default=0, help="test digits verified (0: all)")
    parser.add_argument("--train-args", default="", help="extra certnas train flags, space-separated (small runs)")
    parser.add_argument("--out", type=Path, default=Path("runs/same-recipe"))
    parser.add_argument("--summarise", action="store_true", help="only rewrite the tables from the finished stages")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        parser.error(f"unknown network {unknown[0]!r} (choose from {', '.join(NETWORKS)})")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected integers like 0,1")
    if not args.summarise:
        if "dsrna-cb" in names and not args.genotype.is_file():
            parser.error(f"--genotype {args.genotype}: no such file")
        data = ["--data", args.data] + (["--data-root", args.data_root] if args.data_root else [])
        args.out.mkdir(parents=True, exist_ok=True)
        record_run(args.out, {"command": " ".join(["python -m benchmarks.same_recipe", *(argv or sys.argv[1:])]),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "recipe": RECIPE,
                              "environment": environment()})
        try:
            for seed in seeds:
                for name in names:
                    run_stage(args.out, name, seed, data, args.genotype, args.eps, args.n, args.train_args.split())
        except subprocess.CalledProcessError as error:  # certnas said why on stderr
            hint = "it refused its input" if error.returncode == 2 else "rerun to resume"
            print(f"same_recipe: certnas {error.cmd[4]} stopped (exit {error.returncode}); {hint}", file=sys.stderr)
            sys.exit(error.returncode)
        except ConfigError as error:
            parser.error(str(error))
    return summarise(args.out, args.eps)


if __name__ == "__main__":
    main()
