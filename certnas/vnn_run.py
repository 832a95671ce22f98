"""``certnas verify MODEL --vnnlib PROP``: decide a VNNLIB property (VNN-COMP) on an ONNX or certnas model.

The ONNX network is converted and checked against onnxruntime on the property's input box
(``verifiers.onnx_model``); a counterexample is confirmed by onnxruntime too before ``sat`` is reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from certnas.config import ConfigError
from certnas.io import load_model_with_meta
from certnas.files import atomic_write_text
from verifiers.verify import METHODS
from verifiers.vnn import VnnResult, check_property
from verifiers.vnnlib import VnnlibError, parse_vnnlib


@dataclass(frozen=True)
class VnnConfig:
    """timeout: seconds for the whole decision; restarts / steps: the attack (PGD per output clause);
    methods: the bound methods tried in order (milp where the network is a small ReLU chain)."""
    timeout: float = 60.0
    methods: Tuple[str, ...] = METHODS
    restarts: int = 10
    steps: int = 100
    milp_max_relus: int = 2000
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> "VnnConfig":
        if not (self.timeout > 0) or math.isinf(self.timeout):
            raise ConfigError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.restarts < 1 or self.steps < 1:
            raise ConfigError("the attack needs restarts >= 1 and steps >= 1")
        return self


def process_started() -> float:
    """When this process started, as a ``time.perf_counter()`` reading (Linux: from /proc; elsewhere: now), so
    that a deadline counts the interpreter's start-up and imports, as VNN-COMP's timeouts do."""
    import os
    import time
    try:
        ticks = int(open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        age = max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        age = 0.0
    return time.perf_counter() - age


def command_started() -> float:
    """Where a ``certnas verify --vnnlib`` deadline counts from: the process's start (``process_started``) when the
    process was started to run the command (``certnas ...`` or ``python -m certnas.cli ...``), else now (the
    command called from a longer-lived process, such as a test runner or a notebook, whose earlier life is not
    this command's)."""
    import sys
    import time
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return process_started() if program in ("certnas", "cli.py") else time.perf_counter()


def run_vnnlib(config: VnnConfig, model_path: Path, vnnlib_path: Path, result_file: Optional[Path] = None,
               log: Optional[Callable[[str], None]] = None, began: Optional[float] = None) -> VnnResult:
    """Decide the property; write the VNN-COMP result file when ``result_file`` is given. The timeout counts
    from ``began`` (a ``time.perf_counter()`` reading; default: now), start-up included."""
    import time
    began = time.perf_counter() if began is None else began
    config.validate()
    prop = parse_vnnlib(vnnlib_path)
    confirm = None
    if Path(model_path).suffix.lower() == ".onnx":
        from verifiers.onnx_model import load_onnx
        loaded = load_onnx(model_path, lower=torch.as_tensor(prop.lower), upper=torch.as_tensor(prop.upper))
        model, shape, outputs = loaded.model, loaded.input_shape, int(torch.tensor(loaded.output_shape).prod())
        if len(loaded.output_shape) != 2:  # bounds take a specification over a flat output: Y_i in C order
            model = torch.nn.Sequential(model, torch.nn.Flatten())
        confirm = loaded.run_runtime
        if log is not None:
            log(f"{model_path}: opset {loaded.opset}, input {shape}, output {loaded.output_shape}; "
                f"equal to onnxruntime within {loaded.runtime_difference:.2g}")
    else:
        model, meta = load_model_with_meta(Path(model_path), map_location="cpu")
        network = meta["network"]
        shape = (1, network["in_channels"], network["image_size"], network["image_size"])
        outputs = network["num_classes"]
    if len(prop.lower) != int(torch.tensor(shape).prod()) or prop.num_outputs != outputs:
        raise VnnlibError(f"{vnnlib_path}: declares {len(prop.lower)} inputs and {prop.num_outputs} outputs; the "
                          f"network has {int(torch.tensor(shape).prod())} inputs {shape} and {outputs} outputs")
    model = model.to(config.device).eval()
    result = check_property(model, prop, shape, timeout=config.timeout, methods=config.methods,
                            restarts=config.restarts, steps=config.steps, seed=config.seed, confirm=confirm,
                            milp_max_relus=config.milp_max_relus, log=log, began=began)
    if result_file is not None:
        atomic_write_text(Path(result_file), result.result_text())
    return result
