"""Game-based evaluation: robust accuracy of a model file under each attack, on the same samples.

A sample counts as robust to an attack when it is classified correctly both clean and at the
adversarial example. ``all`` also reports the worst case over the attacks run (robust to every one).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from certnas.attacks import ATTACKS
from certnas.config import (ConfigError, check_choices, data_root_setting, data_setting, device_setting, eps_setting, norm_setting,
                            samples_setting, seed_setting, setting)
from certnas.evaluation import Evaluation, predict, prepare
from certnas.files import atomic_write_json, atomic_write_text, environment
from verifiers.bounds import parse_norm

ATTACK_NAMES = tuple(ATTACKS)


@dataclass(frozen=True)
class AttackConfig:
    """Settings of ``certnas attack``. steps / restarts apply to pgd and cw; fgsm is one step;
    AutoAttack (standard version) sets its own."""
    attacks: Tuple[str, ...] = setting(ATTACK_NAMES, "fgsm, pgd, cw, autoattack, a comma-separated list, or all.",
                                       kind="list", flag="--attack", everything=ATTACK_NAMES, shown="all",
                                       choices=ATTACK_NAMES)
    eps: float = eps_setting(0.1, "0.1")
    norm: str = norm_setting()
    steps: int = setting(100, "Steps of pgd and cw.")
    restarts: int = setting(1, "Random restarts of pgd and cw.")
    n: int = samples_setting()
    batch_size: int = setting(250, "Samples attacked at once.")
    data: Optional[str] = data_setting(None)
    data_root: Optional[str] = data_root_setting()
    autoattack_version: str = setting("standard", "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square), or fast: "
                                      "APGD-CE and APGD-T only.", choices=("standard", "fast"))
    seed: int = seed_setting()
    device: str = device_setting()

    def validate(self) -> "AttackConfig":
        check_choices(self)
        if self.steps < 1 or self.restarts < 1 or self.batch_size < 1:
            raise ConfigError("steps, restarts and batch_size must be >= 1")
        if self.eps < 0:
            raise ConfigError(f"eps must be >= 0, got {self.eps}")
        return self


def robust_flags(evaluation: Evaluation, name: str, config: AttackConfig, progress=None) -> torch.Tensor:
    """(n,) bool: correct on the clean sample and on the attack's adversarial example."""
    norm = parse_norm(config.norm)
    model, x, y = evaluation.model, evaluation.x, evaluation.y
    options = {"version": config.autoattack_version} if name == "autoattack" else {}
    attack = ATTACKS[name](model, config.eps, norm, steps=config.steps, restarts=config.restarts, **options)
    flags = []
    for start in range(0, len(x), config.batch_size):
        xb, yb = x[start:start + config.batch_size], y[start:start + config.batch_size]
        torch.manual_seed(config.seed + start)
        x_adv = attack(xb, yb)
        _check_in_ball(x_adv, xb, config.eps, norm, name)
        with torch.no_grad():
            flags.append((model(xb).argmax(1) == yb) & (model(x_adv).argmax(1) == yb))
        if progress is not None:
            progress.update(len(xb))
    return torch.cat(flags)


def _check_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: float, name: str) -> None:
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(dim=1).values if norm == math.inf else delta.norm(dim=1)
    if (size > eps * (1 + 1e-5) + 1e-6).any() or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f"attack {name} left the eps ball or [0, 1] (a bug)")


def run_attacks(config: AttackConfig, model_path: Path, out: Optional[Path] = None, *,
                quiet: bool = False) -> Dict[str, Any]:
    """Robust accuracy per attack; writes ``attack.csv``, ``attack_samples.csv`` and
    ``attack.json`` under ``out`` when given. Returns the JSON summary."""
    import pandas as pd
    config.validate()
    evaluation = prepare(model_path, data=config.data, data_root=Path(config.data_root) if config.data_root else None,
                         n=config.n, seed=config.seed, device=config.device)
    correct = predict(evaluation.model, evaluation.x) == evaluation.y
    rows: List[Dict[str, Any]] = [{"attack": "clean", "robust_accuracy": correct.sum().item() / len(correct),
                                   "n": len(correct), "seconds": 0.0}]
    per_sample = {"index": evaluation.indices.tolist(), "label": evaluation.y.tolist(), "clean": correct.tolist()}
    worst = correct.clone()
    with tqdm(total=len(config.attacks) * len(correct), desc="attack", disable=quiet, leave=False) as progress:
        for name in config.attacks:
            began = time.time()
            flags = robust_flags(evaluation, name, config, progress)
            worst &= flags
            per_sample[name] = flags.tolist()
            rows.append({"attack": name, "robust_accuracy": flags.sum().item() / len(flags), "n": len(flags),
                         "seconds": round(time.time() - began, 2)})
    if len(config.attacks) > 1:
        rows.append({"attack": "worst-case", "robust_accuracy": worst.sum().item() / len(worst), "n": len(worst),
                     "seconds": round(sum(r["seconds"] for r in rows), 2)})
    for row in rows:
        row.update(eps=config.eps, norm=config.norm, steps=config.steps if row["attack"] in ("pgd", "cw") else "",
                   restarts=config.restarts if row["attack"] in ("pgd", "cw") else "",
                   version=config.autoattack_version if row["attack"] == "autoattack" else "")
    summary = {"model": str(model_path), "data": evaluation.data, "results": rows, "settings": asdict(config),
               "versions": environment()}
    if out is not None:
        out = Path(out)
        atomic_write_text(out / "attack.csv", pd.DataFrame(rows).to_csv(index=False))
        atomic_write_text(out / "attack_samples.csv", pd.DataFrame(per_sample).to_csv(index=False))
        atomic_write_json(out / "attack.json", summary)
    return summary
