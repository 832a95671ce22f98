"""Shared helpers for benchmarks: interleaved timing, memory, environment record, atomic JSON."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import torch


def environment() -> Dict[str, str]:
    """Versions, device and git commit, recorded beside every result."""
    from verifiers.lirpa import AUTO_LIRPA_VERSION
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "auto_LiRPA": AUTO_LIRPA_VERSION,
            "machine": platform.machine(), "cpu_count": str(os.cpu_count()), "threads": str(torch.get_num_threads()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "git_commit": commit}


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


def write_json(path: Path, record: dict) -> None:
    """Write atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(record, handle, indent=2)
        temp = handle.name
    os.replace(temp, path)
