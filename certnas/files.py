"""Result files written atomically (a reader never sees half a file) and the environment record every
result file carries."""
from __future__ import annotations

import csv
import io as _io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from certnas import __version__


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def source_commit(directory: Path) -> str:
    """The git commit checked out at ``directory``, with ``+dirty`` when tracked files differ from it; ''
    outside a git checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=directory).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return ""


# read once, when the code is imported: a long run records the commit of the code it runs, not the one
# checked out when it finishes (a 73-minute search recorded a commit made while it ran)
SOURCE_COMMIT = source_commit(Path(__file__).parent)


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows. Timings, and ratios of
    timings, are only comparable on one CPU (README, Benchmarks)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> Dict[str, Any]:
    from verifiers.lirpa import AUTO_LIRPA_VERSION
    return {"certnas": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "auto_LiRPA": AUTO_LIRPA_VERSION, "git_commit": SOURCE_COMMIT,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def write_history(path: Path, rows: List[Dict[str, Any]]) -> None:
    columns: List[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
