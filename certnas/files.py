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


def environment() -> Dict[str, str]:
    from verifiers.lirpa import AUTO_LIRPA_VERSION
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"certnas": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "auto_LiRPA": AUTO_LIRPA_VERSION, "git_commit": commit,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


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
