"""Run folders and the one epoch loop shared by search and training.

A run folder holds ``config.json`` (the resolved settings), ``environment.json``, ``history.csv``
(one row per completed epoch) and ``checkpoint.pt`` (the safe format of ``certnas.io``), all
written atomically. ``--resume`` continues from the last completed epoch with the random state it
had, so an interrupted run ends exactly as an uninterrupted one.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from certnas.distributed import World
from certnas.files import atomic_write_json, environment, write_history
from certnas.io import load_file, save_file
from certnas.errors import CertnasError


class RunFolderError(CertnasError):
    """An output folder that cannot be used as asked."""


def prepare_run_folder(out: Path, *, resume: bool, force: bool) -> Path:
    """Refuse a non-empty folder unless ``resume`` or ``force``; ``force`` empties checkpoints."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} exists and is not a folder")
    non_empty = out.is_dir() and any(out.iterdir())
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise RunFolderError(f"--resume: no checkpoint.pt in {out}")
    elif non_empty and not force:
        raise RunFolderError(f"--out {out} is not empty; use --resume to continue it or --force to overwrite")
    elif non_empty and force:
        for name in ("checkpoint.pt", "history.csv"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def changed_settings(out: Path, config: Any) -> List[str]:
    """The names of the settings in which ``config`` differs from ``out/config.json`` (none: no saved settings)."""
    from dataclasses import asdict
    from certnas.config import upgrade_saved
    path = Path(out) / "config.json"
    if not (path.is_file() and path.read_text().strip()):
        return []
    saved = json.loads(json.dumps(upgrade_saved(type(config), json.loads(path.read_text())), default=str))
    current = json.loads(json.dumps(asdict(config), default=str))
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def check_same_config(out: Path, config: Any) -> None:
    """--resume must continue with the settings saved in ``out/config.json``."""
    from certnas.config import ConfigError
    changed = changed_settings(out, config)
    if changed:
        raise ConfigError(f"--resume: the settings differ from those saved in {Path(out) / 'config.json'} "
                          f"({', '.join(changed)})")


def start_run(config: Any, out: Path, *, resume: bool, force: bool, world: World = World()):
    """What search and training do first: validate, prepare ``out`` (resume with the same settings
    only), seed, load the data, record config.json and environment.json (rank 0 alone writes; the
    other ranks wait for it). Returns ``(out, splits)``."""
    from dataclasses import asdict
    from certnas.data import load_data
    config.validate()
    out = Path(out)
    if world.main:
        out = prepare_run_folder(out, resume=resume, force=force)
    if resume:
        check_same_config(out, config)
    seed_everything(config.seed)
    splits = load_data(config.data, Path(config.data_root) if config.data_root else None, seed=config.seed,
                       image_size=config.image_size)
    if world.main:
        atomic_write_json(out / "config.json", asdict(config))
        atomic_write_json(out / "environment.json", {**environment(), "ranks": world.size,
                                                      "backend": world.backend or None})
    world.barrier()
    return out, splits


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": json.dumps(_numpy_state()), "python": json.dumps(random.getstate())}


def _numpy_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    python_state = json.loads(state["python"])
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def epoch_batches(dataset, batch_size: int, seed: int, epoch: int, limit: int = 0) -> List[torch.Tensor]:
    """The epoch's shuffled sample order, seeded by (seed, epoch): independent of resume."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(len(dataset), generator=generator)
    if limit:
        order = order[:limit]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(dataset, index: torch.Tensor, device: torch.device):
    items = [dataset[int(i)] for i in index]
    x = torch.stack([item[0] for item in items]).to(device)
    y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long, device=device)
    return x, y


def run_epochs(*, out: Path, epochs: int, state: Dict[str, Any], resume: bool,
               epoch_fn: Callable[[int, tqdm], Dict[str, float]], batches_per_epoch: int,
               after_epoch: Optional[Callable[[int, Dict[str, Any]], None]] = None,
               description: str = "epoch", quiet: bool = False, world: World = World()) -> List[Dict[str, Any]]:
    """Run ``epoch_fn(epoch, progress)`` for the remaining epochs, checkpointing after each.

    state: name -> object with ``state_dict`` / ``load_state_dict`` (model, optimisers,
    schedulers). ``after_epoch(epoch, row)`` may add columns to the epoch's history row.
    Every rank resumes from the checkpoint; rank 0 alone prints and writes. Returns the history rows.
    """
    quiet = quiet or not world.main
    checkpoint = Path(out) / "checkpoint.pt"
    history: List[Dict[str, Any]] = []
    start = 0
    if resume:
        tensors, meta = load_file(checkpoint, kind="checkpoint")
        for name, obj in state.items():
            obj.load_state_dict(tensors[name])
        set_rng_state(tensors["rng"])
        history = meta["history"]
        start = meta["epoch"] + 1
    for epoch in range(start, epochs):
        began = time.time()
        with tqdm(total=batches_per_epoch, desc=f"{description} {epoch + 1}/{epochs}", disable=quiet,
                  leave=False, dynamic_ncols=True) as progress:
            row = {"epoch": epoch + 1, **epoch_fn(epoch, progress)}
        row["seconds"] = round(time.time() - began, 2)
        if after_epoch:
            after_epoch(epoch, row)
        history.append(row)
        if world.main:
            tensors = {name: obj.state_dict() for name, obj in state.items()}
            tensors["rng"] = rng_state()
            save_file(checkpoint, "checkpoint", tensors, {"epoch": epoch, "history": history})
            write_history(Path(out) / "history.csv", history)
        if not quiet:
            summary = ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                if isinstance(v, float) and k != "seconds" and not k.startswith("w_"))
            tqdm.write(f"{description} {epoch + 1}/{epochs}: {summary} ({row['seconds']:.0f} s)")
    return history

