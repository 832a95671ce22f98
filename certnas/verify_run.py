"""``certnas verify``: verified accuracy and certified radii of a model file on test samples.

Uses ``verifiers.verify`` with this package's PGD as the falsifier of the soundness guard, and also
reports PGD accuracy on the same samples (an upper bound on robust accuracy) and, with ``radius``,
the PGD attack radius (an upper bound on each sample's robust radius).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from certnas.attacks import PGD
from certnas.config import (ConfigError, check_choices, data_root_setting, data_setting, device_setting, eps_setting, norm_setting,
                            samples_setting, seed_setting, setting)
from certnas.distributed import World
from certnas.evaluation import predict, prepare
from certnas.files import atomic_write_json, atomic_write_text, environment
from verifiers.bounds import parse_norm
from verifiers.verify import (CROWN_MAX_RELUS, METHODS, Status, VerifyOptions, attack_radius, cascade, parse_methods,
                              radii, summarize, unsupported_reason, verify_methods)


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of ``certnas verify``. methods: ``("all",)`` is the cascade; otherwise each listed
    method runs on every sample. radius_max: None is 0.5 (L-inf) or 5.0 (L2)."""
    methods: Tuple[str, ...] = setting(("all",), "ibp, crown-ibp, crown, alpha-crown, milp, a comma-separated list "
                                       "(each on every sample), or all (a cascade: attack, then cheap to strong, each "
                                       "on the undecided samples).", kind="list", flag="--method", everything=("all",))
    eps: float = eps_setting(2 / 255, "2/255")
    norm: str = norm_setting()
    n: int = samples_setting()
    radius: bool = setting(False, "Also the certified radius per sample and method (crown, alpha-crown: a root search "
                                  "on the margin curve; the others: bisection).", kind="flag")
    at_eps: bool = setting(True, "Bound each method at --eps. --no-at-eps with --radius: the accuracy at --eps is read "
                                 "off the radii (radius >= eps), one bound pass per sample less.")
    radius_max: Optional[float] = setting(None, "Upper end of the radius search (default 0.5 L-inf, 5 L2).", kind="eps")
    radius_steps: int = setting(12, "Bisection steps: radii are within radius-max / 2**steps.")
    radius_min: float = setting(0.0, "> 0: bisect in log space on [radius-min, radius-max] (radii spanning many orders "
                                     "of magnitude).", kind="eps", shown="0")
    pgd_steps: int = setting(50, "Steps of the PGD that gives the upper bound and guards every certificate.")
    pgd_restarts: int = 1
    batch_size: int = setting(64, "Samples bounded, or attacked by the PGD guard, at once.")
    milp_time_limit: float = setting(60.0, "Seconds per MILP solve (one per other class); a timeout counts as not "
                                           "certified.")
    milp_max_relus: int = 2000
    crown_max_relus: int = setting(CROWN_MAX_RELUS, "Largest network (ReLU neurons) crown / alpha-crown / bab are run "
                                                    "on (their cost grows with it; 0: no limit).")
    bab_time_limit: float = setting(30.0, "Seconds of branch and bound per sample (method bab; in the cascade, for the "
                                          "samples the bounds leave open).")
    data: Optional[str] = data_setting(None)
    data_root: Optional[str] = data_root_setting()
    seed: int = seed_setting()
    device: str = device_setting()

    def validate(self) -> "VerifyConfig":
        check_choices(self)
        if self.methods != ("all",):
            parse_methods(",".join(self.methods))
        if self.eps < 0 or (self.radius_max is not None and self.radius_max <= 0):
            raise ConfigError("eps must be >= 0 and radius_max > 0")
        if self.radius_min < 0 or self.radius_min >= self.eps_max:
            raise ConfigError(f"--radius-min must lie in [0, --radius-max {self.eps_max:g}), got {self.radius_min:g}")
        if not self.at_eps and (not self.radius or self.methods == ("all",)):
            raise ConfigError("--no-at-eps needs --radius and a list of methods (the accuracy at --eps is then read "
                              "off the radii; the cascade decides at --eps)")
        for name in ("radius_steps", "pgd_steps", "pgd_restarts", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self

    def options(self) -> VerifyOptions:
        """The runners' options (``verifiers.verify.VerifyOptions``) these settings give."""
        return VerifyOptions(batch_size=self.batch_size, milp_time_limit=self.milp_time_limit,
                             milp_max_relus=self.milp_max_relus, crown_max_relus=self.crown_max_relus,
                             bab_time_limit=self.bab_time_limit)

    @property
    def eps_max(self) -> float:
        if self.radius_max is not None:
            return self.radius_max
        return 0.5 if parse_norm(self.norm) == math.inf else 5.0


def falsifier_for(model, config: VerifyConfig, *, remember: bool = True):
    """The guard's attack: PGD with per-sample eps, ``pgd_steps`` steps, ``pgd_restarts`` restarts, and
    random starts seeded per sample (the same result on a sample whatever batch or shard it is in), attacked
    ``batch_size`` samples at a time (all 10,000 MNIST test digits at once took 10 GB for a DARTS network).
    Being deterministic per (pixels, label, eps), with ``remember`` each result is kept: the guard of every
    bound method then reuses the attack verify ran first on every sample at the eps verified instead of
    repeating it (three PGD-50 passes over the 10,000 digits for two methods before). Without it nothing is
    kept (for the radius search, whose eps differ per sample and step: a kept result would never be reused)."""
    import hashlib
    norm = parse_norm(config.norm)
    done: Dict[Tuple[bytes, int, float], torch.Tensor] = {}

    def key(x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> Tuple[bytes, int, float]:
        pixels = x.detach().cpu().contiguous().numpy().tobytes()
        return hashlib.blake2b(pixels, digest_size=16).digest(), int(y), float(eps)

    def run(x, y, eps):
        return PGD(model, eps, norm, steps=config.pgd_steps, restarts=config.pgd_restarts, seed=config.seed,
                   batch_size=config.batch_size)(x, y)

    def attack(x, y, eps):
        eps = torch.as_tensor(eps, device=x.device, dtype=x.dtype).expand(len(x))
        if not remember:
            return run(x, y, eps) if len(x) else x.clone()
        keys = [key(x[i], y[i], eps[i]) for i in range(len(x))]
        todo = [i for i, k in enumerate(keys) if k not in done]
        if todo:
            done.update(zip((keys[i] for i in todo), run(x[todo], y[todo], eps[todo])))
        return torch.stack([done[k] for k in keys]) if keys else x.clone()
    return attack


@dataclass
class ShardResult:
    """What verifying a part of the samples gives: verify.csv's rows and, per sample (in order), whether
    it is classified correctly and whether PGD leaves it so. Plain data (JSON)."""
    positions: List[int]
    rows: List[Dict[str, Any]]
    clean: List[bool]
    pgd: List[bool]
    skipped: Dict[str, str]
    # per bound method: margins near 0 that the float64 check recomputed, and how many it refused
    rounding: Dict[str, Dict[str, int]] = field(default_factory=dict)


def parse_shard(text: str) -> Tuple[int, int]:
    """``"i/n"`` (0 <= i < n) as ``(i, n)``; ConfigError otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be I/N, e.g. 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {text}: need 0 <= I < N")
    return index, count


def run_verify(config: VerifyConfig, model_path: Path, out: Optional[Path] = None, *, quiet: bool = False,
               shard: Tuple[int, int] = (0, 1), world: World = World()) -> Dict[str, Any]:
    """Verify, write ``verify.csv`` (one row per sample and method) and ``verify.json`` under ``out``,
    return the JSON summary. With several ranks (``world``) each verifies its share of the samples and
    rank 0 writes the merged files; with ``shard=(i, n)`` this process verifies part i of n, writes
    ``verify-shard-i-of-n.json``, and whichever shard finds all n parts there writes the merged files.
    Merged files equal those of one process (attacks are seeded per sample) but for timings."""
    config.validate()
    evaluation = prepare(model_path, data=config.data, data_root=Path(config.data_root) if config.data_root else None,
                         n=config.n, seed=config.seed, device=config.device)
    if world.active:
        shard = (world.rank, world.size)
    positions = torch.tensor_split(torch.arange(len(evaluation.x)), shard[1])[shard[0]].tolist()
    part = _verify_part(config, evaluation, positions, quiet=quiet or not world.main)
    if world.active:
        parts = world.gather_objects(asdict(part))
    elif shard[1] > 1:
        if out is None:
            raise ConfigError("--shard needs --out (a folder the shards share)")
        out = Path(out)
        atomic_write_json(out / f"verify-shard-{shard[0]}-of-{shard[1]}.json",
                          {"settings": asdict(config), "model": str(model_path), "shard": list(shard), **asdict(part)})
        files = [out / f"verify-shard-{i}-of-{shard[1]}.json" for i in range(shard[1])]
        if not all(f.is_file() for f in files):
            return {"shard": list(shard), "n": len(positions), "waiting_for": [str(f) for f in files if not f.is_file()]}
        parts = [json.loads(f.read_text()) for f in files]
        if any(p["settings"] != json.loads(json.dumps(asdict(config))) for p in parts):
            raise ConfigError(f"the shard files in {out} were made with different settings")
    else:
        parts = [asdict(part)]
    rows = _merged_rows(parts)
    summary = _summary(config, model_path, evaluation,
                       [ShardResult(**{k: p[k] for k in ShardResult.__dataclass_fields__ if k in p}) for p in parts], rows)
    if out is not None and world.main:
        import pandas as pd
        out = Path(out)
        atomic_write_text(out / "verify.csv", pd.DataFrame(rows).to_csv(index=False))
        atomic_write_json(out / "verify.json", summary)
    return summary


def _verify_part(config: VerifyConfig, evaluation, positions: List[int], *, quiet: bool) -> ShardResult:
    """Every check of ``run_verify`` on the samples at ``positions`` of the evaluation's samples."""
    model = evaluation.model
    x, y = evaluation.x[positions], evaluation.y[positions]
    all_indices = evaluation.indices.tolist()
    indices = [all_indices[p] for p in positions]
    falsifier = falsifier_for(model, config)
    common = dict(indices=indices, falsifier=falsifier, options=config.options())
    run_cascade = config.methods == ("all",)
    methods = list(METHODS) if run_cascade else list(config.methods)
    clean = (predict(model, x) == y)
    eps_t = torch.full((len(x),), float(config.eps), device=x.device, dtype=x.dtype)
    with torch.no_grad():
        pgd_robust = clean & (model(falsifier(x, y, eps_t)).argmax(1) == y) if len(x) else clean
    rows: List[Dict[str, Any]] = []
    rounding: Dict[str, Dict[str, int]] = {}
    # methods the cascade leaves out on this model (explicitly listed ones raise instead)
    example = evaluation.x[:1]
    reasons = {m: unsupported_reason(model, example, m, parse_norm(config.norm), config.options()) for m in methods}
    skipped = {m: reason for m, reason in reasons.items() if run_cascade and reason is not None}
    total = len(x) * (1 + len(methods) * (int(config.at_eps) + int(config.radius)))
    with tqdm(total=total, desc="verify", disable=quiet, leave=False) as bar:
        if len(x) == 0 or not config.at_eps:
            pass
        elif run_cascade:
            results = cascade(model, x, y, config.eps, norm=config.norm, methods=methods, progress=bar.update,
                              rounding=rounding, **common)
            rows += [{**r.row(), "mode": "cascade"} for r in results]
        else:
            results = verify_methods(model, x, y, config.eps, norm=config.norm, methods=methods,
                                     progress=bar.update, rounding=rounding, **common)
            rows += [{**r.row(), "mode": "eps"} for r in results]
        if config.radius and len(x):
            radius_methods = [m for m in methods if m not in skipped and m != "bab"]  # bab decides at one eps
            searching = falsifier_for(model, config, remember=False)  # per-sample eps: nothing to reuse
            upper = attack_radius(model, x, y, searching, eps_max=config.eps_max, steps=config.radius_steps)
            found = radii(model, x, y, norm=config.norm, methods=radius_methods, eps_max=config.eps_max,
                          steps=config.radius_steps, eps_min=config.radius_min, progress=bar.update,
                          attack_upper=upper, **{**common, "falsifier": searching})
            rows += [{**r.row(), "mode": "radius"} for r in found]
            prediction = predict(model, x).tolist()
            for i, value in enumerate(upper.tolist()):
                rows.append({"index": indices[i], "label": int(y[i]), "prediction": prediction[i],
                             "method": f"pgd-{config.pgd_steps}", "status": "attack-radius", "certified": False,
                             "margin_bound": None, "radius": value, "seconds": None, "mode": "radius"})
    position_of = dict(zip(indices, positions))
    for row in rows:
        row["position"] = position_of[row["index"]]
    return ShardResult(positions, rows, clean.tolist(), pgd_robust.tolist(), skipped, rounding)


def _merged_rows(parts: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """verify.csv's rows of all parts in one process's order: by (mode, method) block as the parts
    list them, then by sample; without the bookkeeping column ``position``."""
    blocks: Dict[Tuple[str, str], int] = {}
    for part in parts:
        for row in part["rows"]:
            blocks.setdefault((row["mode"], row["method"]), len(blocks))
    rows = [row for part in parts for row in part["rows"]]
    rows.sort(key=lambda row: (blocks[(row["mode"], row["method"])], row["position"]))
    return [{k: v for k, v in row.items() if k != "position"} for row in rows]


def _summary(config: VerifyConfig, model_path: Path, evaluation, parts: List[ShardResult],
             rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """verify.json's content from the parts (in sample order) of one verification and their merged rows."""
    run_cascade = config.methods == ("all",)
    methods = list(METHODS) if run_cascade else list(config.methods)
    n = sum(len(p.positions) for p in parts)
    clean = sum(sum(p.clean) for p in parts)
    pgd = sum(sum(p.pgd) for p in parts)
    skipped = parts[0].skipped if parts else {}
    summary_rows: List[Dict[str, Any]] = [{"method": "clean", "accuracy": clean / n},
                                          {"method": f"pgd-{config.pgd_steps}", "accuracy": pgd / n}]
    if run_cascade:
        results = [r for r in rows if r["mode"] == "cascade"]
        certified = [r for r in results if r["status"] == Status.CERTIFIED.value]
        summary_rows.append({"method": "cascade", "accuracy": len(certified) / n,
                             "falsified": sum(r["status"] == Status.FALSIFIED.value for r in results) / n,
                             "unknown": sum(r["status"] == Status.UNKNOWN.value for r in results) / n,
                             "certified_by": {m: sum(r["method"] == m for r in certified) for m in methods}})
    else:
        for method in methods:
            if not config.at_eps:  # read off the radii: certified at eps where the radius reaches it
                mine = [r for r in rows if r["mode"] == "radius" and r["method"] == method]
                summary_rows.append({"method": method, "from_radius": True,
                                     "accuracy": sum(r["radius"] >= config.eps > 0 or (r["radius"] > 0 and
                                                     config.eps == 0) for r in mine) / n,
                                     "seconds_per_sample": None})
                continue
            mine = [r for r in rows if r["mode"] == "eps" and r["method"] == method]
            seconds = [r["seconds"] for r in mine if r["seconds"] is not None]
            summary_rows.append({"method": method,
                                 "accuracy": sum(r["status"] == Status.CERTIFIED.value for r in mine) / n,
                                 "seconds_per_sample": sum(seconds) / len(seconds) if seconds else None})
    rounding: Dict[str, Dict[str, int]] = {}
    for part in parts:
        for method, counts in part.rounding.items():
            total = rounding.setdefault(method, {"rechecked": 0, "rejected": 0})
            for key in total:
                total[key] += counts.get(key, 0)
    radius_summary: Dict[str, Any] = {}
    if config.radius:
        for method in [m for m in methods if m not in skipped and m != "bab"] + [f"pgd-{config.pgd_steps}"]:
            values = [r["radius"] for r in rows if r["mode"] == "radius" and r["method"] == method]
            name = method if not method.startswith("pgd-") else f"{method} (upper)"
            radius_summary[name] = summarize(values)
    return {"model": str(model_path), "data": evaluation.data, "n": n, "eps": config.eps, "norm": config.norm,
            "results": summary_rows, "radius": radius_summary, "skipped": skipped, "rounding": rounding,
            "radius_tolerance": (None if not config.radius else
                                 f"factor {(config.eps_max / config.radius_min) ** (1 / 2 ** config.radius_steps):.6g}"
                                 if config.radius_min > 0 else config.eps_max / 2 ** config.radius_steps),
            "settings": asdict(config), "versions": environment()}
