"""Regenerate the DSRNA paper's tables: search -> train -> attack -> verify for every row and seed.

    python -m benchmarks.paper --table all --scale cpu [--seeds 3] [--data-root DIR] [--device cuda]

Rows: DARTS (metric none), PC-DARTS (none, partial channels + edge normalisation), SDARTS-ADV, PGD
search, DSRNA-CB (clb), DSRNA-Jacobian, DSRNA-Combined. Each derived cell is trained with standard
training (the paper's robustness comes from the architecture), attacked (FGSM, PGD-100, C&W-loss
PGD-100, AutoAttack L2) and verified (certified radius by IBP, CROWN-IBP and CROWN, L-inf and L2).

Every stage is cached under ``<out>/cache/<stage>-<hash>`` by a hash of its full configuration and
of the stages it depends on, so an interrupted or extended run (more seeds, another table) only
computes what is missing. Tables (CSV + Markdown), figures (PNG), ``records.jsonl`` (one record per
row, seed and dataset) and ``run.json`` (command, git commit, versions) go to ``<out>``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.common import cached_stage, config_hash
from certnas.attack_eval import AttackConfig, run_attacks
from certnas.files import atomic_write_json, atomic_write_text, environment
from certnas.search import SearchConfig, search
from certnas.train import TrainConfig, train
from certnas.verify_run import VerifyConfig, run_verify

ROWS: Dict[str, Dict[str, Any]] = {
    "DARTS": {"metric": "none"},
    "PC-DARTS": {"metric": "none", "partial_channels": 2, "edge_normalization": True},
    "SDARTS-ADV": {"metric": "sdarts-adv"},
    "PGD search": {"metric": "pgd"},
    "DSRNA-CB": {"metric": "clb"},
    "DSRNA-Jacobian": {"metric": "jacobian"},
    "DSRNA-Combined": {"metric": "combined"},
}
TABLES = ("game-mnist", "game-cifar10", "clean", "certified", "search-cost", "imagenet")

# Published numbers, as reported by others (../shared/paper_reported.md): (table, dataset, row, column) -> value
REPORTED = {
    ("game", "cifar10", "DSRNA-Combined", "PGD-100"): 60.71, ("game", "cifar10", "DSRNA-Combined", "FGSM"): 70.32,
    ("game", "cifar10", "DSRNA-Combined", "C&W"): 64.76, ("game", "cifar10", "DSRNA-Combined", "AutoAttack (L2)"): 64.51,
    ("game", "cifar10", "DSRNA-Combined", "clean"): 97.51, ("game", "mnist", "DSRNA-Combined", "clean"): 99.40,
    ("certified", "mnist", "DSRNA-CB", "L2 mean"): 0.4288, ("certified", "mnist", "SDARTS-ADV", "L2 mean"): 0.1767,
    ("cost", "cifar10", "DSRNA-CB", "GPU-days"): 4, ("cost", "cifar10", "DSRNA-Jacobian", "GPU-days"): 0.4,
    ("cost", "mnist", "DSRNA-CB", "GPU-days"): 1, ("cost", "mnist", "DSRNA-Jacobian", "GPU-days"): 0.2,
}


@dataclass(frozen=True)
class Scale:
    """Settings of one scale. eps: attack radii per dataset and norm; verify_eps: the eps at which
    verified accuracy is read off the certified radii."""
    name: str
    search: Dict[str, Any]
    train: Dict[str, Any]
    attack_n: int
    attack_steps: int
    autoattack_version: str
    verify_n: int
    radius_steps: int
    verify_pgd_steps: int
    eps: Dict[str, Dict[str, float]]
    verify_eps: Dict[str, Dict[str, float]]
    mnist: str = "mnist-embedded"
    image_size: int = 32
    radius_max: Dict[str, float] = field(default_factory=lambda: {"inf": 0.5, "2": 5.0})
    # Log-space bisection from 1e-6: certified radii of standard-trained DARTS networks span many
    # orders of magnitude. Below ~1e-7 a float32 pixel near 1 cannot move at all, so smaller "radii"
    # would certify rounding, not robustness.
    radius_min: float = 1e-6
    # ImageNet transfer: the CIFAR-10 cell trained on ImageNet. image_size, attack eps (L-inf, pixels)
    # and the training settings that differ from ``train``.
    imagenet: Dict[str, Any] = field(default_factory=lambda: {"image_size": 32, "eps": 1 / 255, "train": {}})


# The paper's protocol: the supernet's weights get standard training, DARTS' architecture learning rate
# and the paper's gamma (certnas search's defaults differ since the claim experiment, benchmarks/claim.py).
PAPER_PROTOCOL = {"stem": "cifar", "weight_mode": "standard", "a_lr": 3e-4, "gamma": 0.01}

SCALES = {
    # About 4 minutes per row and seed on a 2-core CPU: 7 rows x 3 seeds on embedded MNIST.
    "cpu": Scale("cpu",
                 search={"layers": 3, "init_channels": 4, "epochs": 2, "train_limit": 256, "val_limit": 256,
                         "batch_size": 32, "metric_samples": 8, **PAPER_PROTOCOL},
                 train={"layers": 3, "init_channels": 8, "epochs": 3, "batch_size": 64, "eval_limit": 1000,
                        "stem": "cifar"},
                 attack_n=100, attack_steps=100, autoattack_version="fast", verify_n=100, radius_steps=10,
                 verify_pgd_steps=10,
                 eps={"mnist": {"inf": 0.05, "2": 0.5}, "cifar10": {"inf": 2 / 255, "2": 0.1}},
                 verify_eps={"mnist": {"inf": 0.005, "2": 0.05}, "cifar10": {"inf": 0.5 / 255, "2": 0.01}},
                 # Downsampled (32x32) ImageNet, as in Chrabaszcz et al. 2017, on a 10,000-image subset.
                 imagenet={"image_size": 32, "eps": 1 / 255, "train": {"train_limit": 10000, "eval_limit": 1000}}),
    # For the end-to-end test only: seconds.
    "tiny": Scale("tiny",
                  search={"layers": 3, "init_channels": 4, "steps": 2, "multiplier": 2, "epochs": 1, "train_limit": 16,
                          "val_limit": 16, "batch_size": 8, "metric_samples": 4, "bound": "ibp", **PAPER_PROTOCOL},
                  train={"layers": 3, "init_channels": 4, "epochs": 1, "batch_size": 32, "train_limit": 64, "eval_limit": 50,
                         "stem": "cifar"},
                  attack_n=10, attack_steps=3, autoattack_version="fast", verify_n=8, radius_steps=3, verify_pgd_steps=2,
                  eps={"mnist": {"inf": 0.05, "2": 0.5}, "cifar10": {"inf": 2 / 255, "2": 0.1}},
                  verify_eps={"mnist": {"inf": 0.005, "2": 0.05}, "cifar10": {"inf": 0.5 / 255, "2": 0.01}},
                  imagenet={"image_size": 16, "eps": 1 / 255, "train": {}}),
    # The paper's settings (a GPU run): search 8 cells / 16 channels / 50 epochs, final 20 / 36 / 600.
    "paper": Scale("paper",
                   search={"layers": 8, "init_channels": 16, "epochs": 50, "train_limit": 0, "val_limit": 0,
                           "batch_size": 64, "metric_samples": 16, **PAPER_PROTOCOL},
                   train={"layers": 20, "init_channels": 36, "epochs": 600, "batch_size": 96, "auxiliary": True,
                          "drop_path": 0.2, "eval_limit": 0, "stem": "cifar"},
                   attack_n=1000, attack_steps=100, autoattack_version="standard", verify_n=1000, radius_steps=15,
                   verify_pgd_steps=50,
                   eps={"mnist": {"inf": 0.1, "2": 1.0}, "cifar10": {"inf": 8 / 255, "2": 0.5}},
                   verify_eps={"mnist": {"inf": 0.01, "2": 0.1}, "cifar10": {"inf": 2 / 255, "2": 0.1}},
                   mnist="mnist",
                   # DARTS' ImageNet mobile setting: 14 cells, 48 channels, 224 pixels, ImageNet stems.
                   imagenet={"image_size": 224, "eps": 1 / 255,
                             "train": {"layers": 14, "init_channels": 48, "epochs": 250, "batch_size": 128,
                                       "stem": "imagenet", "drop_path": 0.0}}),
}


PAPER_CROWN_MAX_RELUS = 4000


class Pipeline:
    """Runs (or reuses) the cached stages of one scale."""

    def __init__(self, scale: Scale, out: Path, data_root: Optional[Path], device: str, quiet: bool = True):
        self.scale, self.out, self.data_root, self.device, self.quiet = scale, Path(out), data_root, device, quiet
        self.cache = self.out / "cache"

    def available(self, name: str) -> Optional[str]:
        """None if the data set can be loaded, else the reason it cannot."""
        if name == "mnist-embedded":
            return None
        if self.data_root is None:
            return f"no --data-root given for {name}"
        from certnas.data import DataError, load_data
        try:
            load_data(name, self.data_root, image_size=self._image_size(name))
        except DataError as error:
            return str(error)
        return None

    def _stage(self, stage: str, key: str, marker: str, run) -> Path:
        return cached_stage(self.cache, stage, key, marker, run)

    def search(self, row: str, dataset: str, seed: int) -> Path:
        config = SearchConfig(**{**self.scale.search, **ROWS[row]}, data=self._data(dataset), seed=seed,
                              data_root=self._root(dataset), image_size=self.scale.image_size, device=self.device)
        key = config_hash("search", asdict(config))
        return self._stage("search", key, "genotype.json",
                           lambda folder, resume: search(config, folder, resume=resume, force=not resume, quiet=self.quiet))

    def train(self, row: str, dataset: str, seed: int) -> Path:
        searched = self.search(row, dataset, seed)
        config = TrainConfig(**self.scale.train, genotype=str(searched / "genotype.json"), data=self._data(dataset),
                             data_root=self._root(dataset), image_size=self.scale.image_size, seed=seed,
                             device=self.device)
        return self._train_stage("train", config, searched)

    def _train_stage(self, stage: str, config: TrainConfig, searched: Path) -> Path:
        # The genotype path is where this clone keeps its cache: the key names the search stage instead,
        # so a moved or cloned results folder keeps its cache.
        key = config_hash(stage, {**asdict(config), "genotype": None}, searched.name)
        return self._stage(stage, key, "model.pt",
                           lambda folder, resume: train(config, folder, resume=resume, force=not resume, quiet=self.quiet))

    def attack(self, model: Path, dataset: str, norm: str) -> Dict[str, Any]:
        attacks = ("fgsm", "pgd", "cw") if norm == "inf" else ("autoattack",)
        config = AttackConfig(attacks=attacks, eps=self.scale.eps[dataset][norm], norm=norm, steps=self.scale.attack_steps,
                              n=self.scale.attack_n, autoattack_version=self.scale.autoattack_version,
                              data_root=self._root(dataset), device=self.device)
        return self._attack_stage(config, model)

    def _attack_stage(self, config: AttackConfig, model: Path) -> Dict[str, Any]:
        folder = self._stage("attack", config_hash("attack", asdict(config), model.parent.name), "attack.json",
                             lambda folder, resume: run_attacks(config, model, folder, quiet=self.quiet))
        return json.loads((folder / "attack.json").read_text())

    def verify(self, model: Path, dataset: str, norm: str) -> Dict[str, Any]:
        from certnas.io import load_model
        from verifiers.verify import crown_feasible
        import torch
        probe = torch.rand(1, *self._input_shape(model))
        # 4000: the ReLU limit of full CROWN when these tables were computed (no cpu-scale network is under it).
        # Filling the CROWN column with the faster sparse CROWN of verifiers.bounds is still to be run.
        methods = ("ibp", "crown-ibp") + (("crown",) if crown_feasible(load_model(model), probe, "crown",
                                                                        PAPER_CROWN_MAX_RELUS) else ())
        config = VerifyConfig(methods=methods, eps=self.scale.verify_eps[dataset][norm], norm=norm, n=self.scale.verify_n,
                              radius=True, radius_max=self.scale.radius_max[norm], radius_steps=self.scale.radius_steps,
                              radius_min=self.scale.radius_min,
                              pgd_steps=self.scale.verify_pgd_steps, data_root=self._root(dataset), device=self.device)
        folder = self._stage("verify", config_hash("verify", asdict(config), model.parent.name), "verify.json",
                             lambda folder, resume: run_verify(config, model, folder, quiet=self.quiet))
        return {"summary": json.loads((folder / "verify.json").read_text()), "csv": folder / "verify.csv"}

    def transfer(self, row: str, seed: int) -> Dict[str, Any]:
        """The row's CIFAR-10 cell trained on ImageNet, then FGSM / PGD at the scale's ImageNet eps."""
        searched = self.search(row, "cifar10", seed)
        settings = {**self.scale.train, **self.scale.imagenet["train"]}
        config = TrainConfig(**settings, genotype=str(searched / "genotype.json"), data="imagenet",
                             data_root=self._root("imagenet"), image_size=self._image_size("imagenet"), seed=seed,
                             device=self.device)
        trained = self._train_stage("transfer", config, searched)
        summary = json.loads((trained / "summary.json").read_text())
        record: Dict[str, Any] = {"row": row, "dataset": "imagenet", "seed": seed, "scale": self.scale.name,
                                  "cell_searched_on": "cifar10", "train_test_acc": summary["test_acc"],
                                  "train_test_top5_acc": summary.get("test_top5_acc"),
                                  "test_samples": summary["test_samples"]}
        attack = AttackConfig(attacks=("fgsm", "pgd"), eps=self.scale.imagenet["eps"], norm="inf",
                              steps=self.scale.attack_steps, n=self.scale.attack_n, data_root=self._root("imagenet"),
                              device=self.device)
        for result in self._attack_stage(attack, trained / "model.pt")["results"]:
            record[f"attack_{result['attack']}_inf"] = result["robust_accuracy"]
        return record

    def record(self, row: str, dataset: str, seed: int) -> Dict[str, Any]:
        """One row, seed and dataset through the whole pipeline; returns its record."""
        searched = self.search(row, dataset, seed)
        trained = self.train(row, dataset, seed)
        record: Dict[str, Any] = {"row": row, "dataset": dataset, "seed": seed, "scale": self.scale.name,
                                  "search_seconds": json.loads((searched / "stage.json").read_text())["seconds"]
                                  if (searched / "stage.json").is_file() else None,
                                  "genotype": json.loads((searched / "genotype.json").read_text())["normal"],
                                  "train_test_acc": json.loads((trained / "summary.json").read_text())["test_acc"]}
        for norm in ("inf", "2"):
            for result in self.attack(trained / "model.pt", dataset, norm)["results"]:
                record[f"attack_{result['attack']}_{norm}"] = result["robust_accuracy"]
            verified = self.verify(trained / "model.pt", dataset, norm)
            record[f"radius_{norm}"] = verified["summary"]["radius"]
            record[f"radius_csv_{norm}"] = str(verified["csv"].relative_to(self.out))
            record[f"verify_eps_{norm}"] = self.scale.verify_eps[dataset][norm]
            record[f"clean_{norm}"] = next(r["accuracy"] for r in verified["summary"]["results"] if r["method"] == "clean")
        return record

    def _image_size(self, name: str) -> int:
        return self.scale.imagenet["image_size"] if name == "imagenet" else self.scale.image_size

    def _data(self, dataset: str) -> str:
        return self.scale.mnist if dataset == "mnist" else dataset

    def _root(self, dataset: str) -> Optional[str]:
        return None if self._data(dataset) == "mnist-embedded" else (str(self.data_root) if self.data_root else None)

    def _input_shape(self, model: Path):
        from certnas.io import load_file
        network = load_file(model, kind="model")[1]["network"]
        return network["in_channels"], network["image_size"], network["image_size"]


# -- tables ---------------------------------------------------------------------------------------
def _mean_std(values: List[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _mean_std_sci(values: List[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3g}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3g} ± {std:.2g}"


def _add_reported(line: Dict[str, Any], key: tuple, header: str) -> None:
    """Put the published value for ``key`` (table, dataset, row, column) under ``header``, if one is known."""
    value = REPORTED.get(key)
    if value is not None:
        line[header] = f"{value:g}"


def by_row(records: List[Dict], dataset: str):
    """``(row, its records)`` for each row of ``ROWS`` (in order) that has records for ``dataset``."""
    for row in ROWS:
        mine = [r for r in records if r["row"] == row and r["dataset"] == dataset]
        if mine:
            yield row, mine


def game_table(records: List[Dict], dataset: str):
    import pandas as pd
    columns = [("clean", "attack_clean_inf"), ("FGSM", "attack_fgsm_inf"), ("PGD-100", "attack_pgd_inf"),
               ("C&W", "attack_cw_inf"), ("AutoAttack (L2)", "attack_autoattack_2")]
    out = []
    for row, mine in by_row(records, dataset):
        line = {"row": row, "seeds": len(mine)}
        for name, key in columns:
            line[f"{name} (%)"] = _mean_std([r.get(key) for r in mine], 100)
            _add_reported(line, ("game", dataset, row, name), f"{name}, reported by others")
        out.append(line)
    return pd.DataFrame(out)


def certified_table(records: List[Dict], dataset: str, out_folder: Path):
    import pandas as pd
    out = []
    for row, mine in by_row(records, dataset):
        line = {"row": row, "seeds": len(mine)}
        for norm, label in (("inf", "L-inf"), ("2", "L2")):
            for method in ("ibp", "crown-ibp", "crown"):
                stats = [r[f"radius_{norm}"].get(method) for r in mine]
                if all(s is None for s in stats):
                    line[f"{label} {method} mean / median"] = "n/a"
                    continue
                line[f"{label} {method} mean / median"] = (
                    f"{_mean_std_sci([s['mean'] for s in stats if s])} / {_mean_std_sci([s['median'] for s in stats if s])}")
            upper = [r[f"radius_{norm}"].get(next(k for k in r[f"radius_{norm}"] if k.endswith("(upper)")))
                     for r in mine]
            line[f"{label} PGD radius (upper) mean"] = _mean_std_sci([u["mean"] for u in upper])
            line[f"{label} verified acc. % at eps {mine[0][f'verify_eps_{norm}']:g} (best method)"] = _mean_std(
                [_verified_at(r, norm, out_folder) for r in mine], 100)
        _add_reported(line, ("certified", dataset, row, "L2 mean"), "L2 mean, reported by others")
        out.append(line)
    return pd.DataFrame(out)


def _verified_at(record: Dict, norm: str, out: Path) -> float:
    """Fraction of samples whose certified radius (best of the methods) reaches the table's eps."""
    import pandas as pd
    rows = pd.read_csv(out / record[f"radius_csv_{norm}"])
    rows = rows[(rows["mode"] == "radius") & (rows["method"].isin(["ibp", "crown-ibp", "crown"]))]
    best = rows.groupby("index")["radius"].max()
    return float((best >= record[f"verify_eps_{norm}"]).mean())


def cost_table(records: List[Dict], dataset: str):
    import pandas as pd
    seconds = {row: [r["search_seconds"] for r in mine]
               for row, mine in by_row([r for r in records if r["search_seconds"]], dataset)}
    base = sum(seconds["DARTS"]) / len(seconds["DARTS"]) if "DARTS" in seconds else None
    out = []
    for row, mine in seconds.items():
        line = {"row": row, "seeds": len(mine), "search seconds": _mean_std(mine, digits=1),
                "ratio to DARTS": f"{(sum(mine) / len(mine)) / base:.2f}" if base else "n/a"}
        _add_reported(line, ("cost", dataset, row, "GPU-days"), "GPU-days (1080Ti), reported by others")
        out.append(line)
    return pd.DataFrame(out)


def clean_table(records: List[Dict], dataset: str):
    import pandas as pd
    out = []
    for row, mine in by_row(records, dataset):
        line = {"row": row, "seeds": len(mine), "clean acc. (%), full test split": _mean_std([r["train_test_acc"] for r in mine], 100)}
        _add_reported(line, ("game", dataset, row, "clean"), "clean, reported by others")
        out.append(line)
    return pd.DataFrame(out)


def imagenet_table(records: List[Dict], scale: Scale):
    import pandas as pd
    out = []
    eps = f"{scale.imagenet['eps']:.4g}"
    for row, mine in by_row(records, "imagenet"):
        out.append({"row": row, "seeds": len(mine),
                    "top-1 (%)": _mean_std([r["train_test_acc"] for r in mine], 100),
                    "top-5 (%)": _mean_std([r["train_test_top5_acc"] for r in mine], 100),
                    f"FGSM (%) at {eps}": _mean_std([r.get("attack_fgsm_inf") for r in mine], 100),
                    f"PGD-{scale.attack_steps} (%) at {eps}": _mean_std([r.get("attack_pgd_inf") for r in mine], 100)})
    return pd.DataFrame(out)


def markdown(frame) -> str:
    """A pipe table (pandas' to_markdown needs the optional tabulate package)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_table(frame, out: Path, name: str, title: str, note: str) -> None:
    frame = frame.fillna("")  # rows without a reported value
    atomic_write_text(out / f"{name}.csv", frame.to_csv(index=False))
    atomic_write_text(out / f"{name}.md", f"# {title}\n\n{note}\n\n{markdown(frame)}\n")


def write_skipped(out: Path, name: str, title: str, reason: str) -> None:
    atomic_write_text(out / f"{name}.md", f"# {title}\n\nSkipped: {reason}\n")
    atomic_write_text(out / f"{name}.csv", f"skipped\n\"{reason}\"\n")


def figures(records: List[Dict], out: Path, dataset: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    from certnas.plots import _save
    for norm, label in (("inf", "L-inf"), ("2", "L2")):
        radii: Dict[str, pd.DataFrame] = {}
        for row, mine in by_row(records, dataset):
            frame = pd.concat([pd.read_csv(out / r[f"radius_csv_{norm}"]).assign(seed=r["seed"]) for r in mine])
            radii[row] = frame[frame["mode"] == "radius"]
        if not radii:
            continue
        fig, ax = plt.subplots(figsize=(10, 4))
        data = [frame[frame["method"] == "crown-ibp"]["radius"].to_numpy() for frame in radii.values()]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(radii) + 1), list(radii), rotation=20)
        ax.set_ylabel(f"certified {label} radius (CROWN-IBP)")
        ax.set_title(f"{dataset}: certified radius per sample, all seeds")
        _save(fig, out / f"radius_{dataset}_{norm}.png")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        grid = np.linspace(0, max(float(f["radius"].max()) for f in radii.values()) * 1.05 + 1e-9, 60)
        for (row, frame), color in zip(radii.items(), plt.cm.tab10.colors):
            certified = frame[frame["method"].isin(["ibp", "crown-ibp", "crown"])].groupby(["seed", "index"])["radius"].max()
            attack = frame[frame["method"].str.startswith("pgd")]["radius"].to_numpy()
            ax.plot(grid, [(certified.to_numpy() >= g).mean() for g in grid], color=color, label=f"{row} verified")
            ax.plot(grid, [(attack > g).mean() for g in grid], color=color, ls="--", label=f"{row} PGD")
        ax.set_xlabel(f"{label} eps")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{dataset}: verified (solid) and PGD (dashed) accuracy against eps")
        ax.legend(fontsize=6, ncol=2)
        _save(fig, out / f"accuracy_vs_eps_{dataset}_{norm}.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="all", help=f"all or one of: {', '.join(TABLES)}")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", default="all", help=f"all or a comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<scale>")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.table != "all" and args.table not in TABLES:
        parser.error(f"unknown table {args.table!r}; known: all, {', '.join(TABLES)}")
    rows = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    scale = SCALES[args.scale]
    out = args.out or Path(__file__).parent / "results" / scale.name
    pipeline = Pipeline(scale, out, args.data_root, args.device, quiet=not args.verbose)
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
        records.append(pipeline.transfer(row, seed) if dataset == "imagenet" else pipeline.record(row, dataset, seed))
        atomic_write_text(records_path, "".join(json.dumps(r) + "\n" for r in records))
    note = (f"Scale `{scale.name}`; {args.seeds} seed(s); mean ± std over seeds (sample std). Values in the "
            f"'reported by others' columns come from ../shared/paper_reported.md (the paper's setting, not ours).")
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
                        note + f" Certified radius per sample (bisection, {scale.radius_steps} steps, "
                        f"{scale.verify_n} test samples), mean / median; CROWN runs only where the network is small "
                        f"enough for matrix mode (n/a otherwise). The PGD radius is an upper bound. Verified accuracy "
                        f"is the share of samples whose best certified radius reaches the eps.")
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


if __name__ == "__main__":
    sys.exit(main())
