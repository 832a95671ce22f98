"""``certnas verify``: verified accuracy and certified radii of a model file on test samples.

Uses ``verifiers.verify`` with this package's PGD as the falsifier of the soundness guard, and also
reports PGD accuracy on the same samples (an upper bound on robust accuracy) and, with ``radius``,
the PGD attack radius (an upper bound on each sample's robust radius).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from certnas.attacks import PGD
from certnas.config import ConfigError
from certnas.evaluation import predict, prepare
from certnas.files import atomic_write_json, atomic_write_text, environment
from verifiers.bounds import parse_norm
from verifiers.verify import (METHODS, Status, attack_radius, cascade, crown_feasible, milp_supported, parse_methods,
                              radii, summarize, verify_methods)


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of ``certnas verify``. methods: ``("all",)`` is the cascade; otherwise each listed
    method runs on every sample. radius_max: None is 0.5 (L-inf) or 5.0 (L2)."""
    methods: Tuple[str, ...] = ("all",)
    eps: float = 2 / 255
    norm: str = "inf"
    n: int = 100
    radius: bool = False
    radius_max: Optional[float] = None
    radius_steps: int = 12
    radius_min: float = 0.0
    pgd_steps: int = 50
    pgd_restarts: int = 1
    batch_size: int = 64
    milp_time_limit: float = 60.0
    milp_max_relus: int = 2000
    crown_max_relus: int = 250000
    data: Optional[str] = None
    data_root: Optional[str] = None
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> "VerifyConfig":
        if self.methods != ("all",):
            parse_methods(",".join(self.methods))
        if self.eps < 0 or (self.radius_max is not None and self.radius_max <= 0):
            raise ConfigError("eps must be >= 0 and radius_max > 0")
        for name in ("radius_steps", "pgd_steps", "pgd_restarts", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self

    @property
    def eps_max(self) -> float:
        if self.radius_max is not None:
            return self.radius_max
        return 0.5 if parse_norm(self.norm) == math.inf else 5.0


def falsifier_for(model, config: VerifyConfig):
    """The guard's attack: PGD with per-sample eps, ``pgd_steps`` steps, ``pgd_restarts`` restarts."""
    norm = parse_norm(config.norm)

    def attack(x, y, eps):
        torch.manual_seed(config.seed)
        return PGD(model, eps, norm, steps=config.pgd_steps, restarts=config.pgd_restarts)(x, y)
    return attack


def run_verify(config: VerifyConfig, model_path: Path, out: Optional[Path] = None, *, quiet: bool = False) -> Dict[str, Any]:
    """Verify, write ``verify.csv`` (one row per sample and method) and ``verify.json`` under ``out``,
    return the JSON summary."""
    import pandas as pd
    config.validate()
    evaluation = prepare(model_path, data=config.data, data_root=Path(config.data_root) if config.data_root else None,
                         n=config.n, seed=config.seed, device=config.device)
    model, x, y = evaluation.model, evaluation.x, evaluation.y
    indices = evaluation.indices.tolist()
    falsifier = falsifier_for(model, config)
    common = dict(indices=indices, falsifier=falsifier, batch_size=config.batch_size,
                  milp_time_limit=config.milp_time_limit, milp_max_relus=config.milp_max_relus,
                  crown_max_relus=config.crown_max_relus)
    run_cascade = config.methods == ("all",)
    methods = list(METHODS) if run_cascade else list(config.methods)
    clean = (predict(model, x) == y)
    eps_t = torch.full((len(x),), float(config.eps), device=x.device, dtype=x.dtype)
    with torch.no_grad():
        pgd_robust = clean & (model(falsifier(x, y, eps_t)).argmax(1) == y)
    rows: List[Dict[str, Any]] = []
    summary_rows: List[Dict[str, Any]] = [
        {"method": "clean", "accuracy": clean.sum().item() / len(x)},
        {"method": f"pgd-{config.pgd_steps}", "accuracy": pgd_robust.sum().item() / len(x)}]
    # methods the cascade leaves out on this model (explicitly listed ones raise instead)
    skipped = {m: "network too large for matrix-mode CROWN" for m in methods
               if run_cascade and not crown_feasible(model, x, m, config.crown_max_relus)}
    skipped.update({m: "milp needs a small ReLU MLP and the L-inf norm" for m in methods if run_cascade and m == "milp"
                    and not milp_supported(model, x.shape[1:], parse_norm(config.norm), config.milp_max_relus)})
    total = len(x) * (1 + len(methods) * (1 + int(config.radius)))
    with tqdm(total=total, desc="verify", disable=quiet, leave=False) as bar:
        if run_cascade:
            results = cascade(model, x, y, config.eps, norm=config.norm, methods=methods, progress=bar.update, **common)
            rows += [{**r.row(), "mode": "cascade"} for r in results]
            certified = [r for r in results if r.status is Status.CERTIFIED]
            summary_rows.append({"method": "cascade", "accuracy": len(certified) / len(x),
                                 "falsified": sum(r.status is Status.FALSIFIED for r in results) / len(x),
                                 "unknown": sum(r.status is Status.UNKNOWN for r in results) / len(x),
                                 "certified_by": {m: sum(r.method == m for r in certified) for m in methods}})
        else:
            results = verify_methods(model, x, y, config.eps, norm=config.norm, methods=methods,
                                     progress=bar.update, **common)
            rows += [{**r.row(), "mode": "eps"} for r in results]
            for method in methods:
                mine = [r for r in results if r.method == method]
                summary_rows.append({"method": method, "accuracy": sum(r.status is Status.CERTIFIED for r in mine) / len(x),
                                     "seconds_per_sample": mine[0].seconds if mine else None})
        radius_summary: Dict[str, Any] = {}
        if config.radius:
            radius_methods = [m for m in methods if m not in skipped]
            found = radii(model, x, y, norm=config.norm, methods=radius_methods, eps_max=config.eps_max,
                          steps=config.radius_steps, eps_min=config.radius_min, progress=bar.update, **common)
            rows += [{**r.row(), "mode": "radius"} for r in found]
            for method in radius_methods:
                values = [r.radius for r in found if r.method == method]
                radius_summary[method] = summarize(values)
            upper = attack_radius(model, x, y, falsifier, eps_max=config.eps_max, steps=config.radius_steps)
            radius_summary[f"pgd-{config.pgd_steps} (upper)"] = summarize(upper.tolist())
            prediction = predict(model, x).tolist()
            for i, value in enumerate(upper.tolist()):
                rows.append({"index": indices[i], "label": int(y[i]), "prediction": prediction[i],
                             "method": f"pgd-{config.pgd_steps}", "status": "attack-radius", "certified": False,
                             "margin_bound": None, "radius": value, "seconds": None, "mode": "radius"})
    summary = {"model": str(model_path), "data": evaluation.data, "n": len(x), "eps": config.eps, "norm": config.norm,
               "results": summary_rows, "radius": radius_summary, "skipped": skipped,
               "radius_tolerance": (None if not config.radius else
                                    f"factor {(config.eps_max / config.radius_min) ** (1 / 2 ** config.radius_steps):.6g}"
                                    if config.radius_min > 0 else config.eps_max / 2 ** config.radius_steps),
               "settings": asdict(config), "versions": environment()}
    if out is not None:
        out = Path(out)
        atomic_write_text(out / "verify.csv", pd.DataFrame(rows).to_csv(index=False))
        atomic_write_json(out / "verify.json", summary)
    return summary

