"""Shared helpers for benchmarks: interleaved timing, memory, a table printer (environment record and
atomic JSON come from certnas.runs)."""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from certnas.files import atomic_write_json as write_json  # noqa: F401  (re-exported for benchmarks)
from certnas.files import environment  # noqa: F401


def interleaved_medians(tasks: Dict[str, Callable[[], None]], repeats: int, warmup: int,
                        sync: Callable[[], None] = lambda: None) -> Dict[str, float]:
    """Median seconds per task; the tasks take turns so machine noise hits all of them alike."""
    for _ in range(warmup):
        for task in tasks.values():
            task()
    times: Dict[str, list] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            sync()
            start = time.perf_counter()
            task()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def saved_tensor_bytes(task: Callable[[], torch.Tensor]) -> int:
    """Bytes of tensors autograd keeps for the backward pass of ``task()`` (activation memory)."""
    total = 0
    seen = set()

    def pack(tensor):
        nonlocal total
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        task()
    return total


def print_table(rows: List[dict], columns: List[Tuple[str, str, str]]) -> None:
    """Print rows as aligned columns: (key, header, format) per column; None prints as blank."""
    widths = [max(len(header), 8) for _, header, _ in columns]
    print("  ".join(f"{header:>{w}}" if i else f"{header:<16}" for i, ((_, header, _), w) in enumerate(zip(columns, widths))))
    for row in rows:
        cells = []
        for i, ((key, _, fmt), w) in enumerate(zip(columns, widths)):
            value = row.get(key)
            text = "" if value is None else format(value, fmt)
            cells.append(f"{text:>{w}}" if i else f"{text:<16}")
        print("  ".join(cells))


def stage_settings(config: Any) -> Dict[str, Any]:
    """A config's settings as a stage key sees them: ``asdict`` without the settings added since the
    caches were made while they hold the value every earlier stage ran with
    (``certnas.config.FORMER_VALUES``; any other value is part of the key), and a search's ``term`` and
    ``strategy`` as the one-word ``metric`` they were keyed by before the split (where one word names them)."""
    from dataclasses import asdict
    from certnas.config import FORMER_VALUES
    settings = asdict(config)
    for name, value in FORMER_VALUES.get(type(config).__name__, {}).items():
        if name in settings and settings[name] == value:
            del settings[name]
    if {"term", "strategy"} <= set(settings) and getattr(config, "metric", None) is not None:
        del settings["term"], settings["strategy"]
        settings["metric"] = config.metric
    return settings


def config_hash(*parts: Any) -> str:
    """12 hex digits naming a configuration (the key of a cached stage)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def model_digest(trained: Path) -> Optional[str]:
    """The sha256 a train stage recorded for its ``model.pt`` (None: trained before digests were kept)."""
    stamp = Path(trained) / "stage.json"
    return json.loads(stamp.read_text()).get("model_sha256") if stamp.is_file() else None


def evaluated(model: Path) -> Dict[str, Optional[str]]:
    """The ``inputs`` of a stage that evaluates ``model`` (a train stage's ``model.pt``)."""
    return {"model": model_digest(Path(model).parent)}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached(cache: Path, stage: str, key: str, marker: str,
           inputs: Optional[Dict[str, Optional[str]]] = None) -> Optional[Path]:
    """The folder of a finished stage made from ``inputs`` (see :func:`cached_stage`), else None."""
    folder = Path(cache) / f"{stage}-{key}"
    if not (folder / marker).is_file():
        return None
    stamp = folder / "stage.json"
    saved = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if inputs is not None and saved.get("inputs", {name: None for name in inputs}) != inputs:
        return None
    return folder


def cached_stage(cache: Path, stage: str, key: str, marker: str, run: Callable[[Path, bool], Any],
                 inputs: Optional[Dict[str, Optional[str]]] = None) -> Path:
    """``cache/<stage>-<key>``, computed by ``run(folder, resume)`` unless ``marker`` is already there
    (a folder with a checkpoint but no marker resumes); ``stage.json`` records the seconds it took at
    torch's thread count.

    ``inputs`` (name -> digest, e.g. the model a stage evaluates; see :func:`model_digest`): a stage made
    from other inputs is stale and runs again. Model files are not committed, so a fresh clone retrains
    them, and a retrained network is not bit-identical to the one the committed attack and verify stages
    measured: without this check those stale results would be reused as the new model's. A stage saved
    without inputs counts as made from inputs without digests. A ``.pt`` marker's digest is recorded."""
    folder = Path(cache) / f"{stage}-{key}"
    stamp = folder / "stage.json"
    if cached(cache, stage, key, marker, inputs) is not None:
        return folder
    if (folder / marker).is_file():
        (folder / marker).unlink()  # made from another model: run it again
    began = time.time()
    resume = (folder / "checkpoint.pt").is_file()
    run(folder, resume)
    record: Dict[str, Any] = {"stage": stage, "seconds": round(time.time() - began, 2), "resumed": resume,
                              "threads": torch.get_num_threads()}
    if inputs is not None and any(value is not None for value in inputs.values()):
        record["inputs"] = inputs
    if marker.endswith(".pt") and (folder / marker).is_file():
        record["model_sha256"] = _file_digest(folder / marker)
    write_json(stamp, record)
    return folder
