"""The safe model / checkpoint file.

A file is a ``torch.save`` of a plain dict: ``{"format": "certnas", "version": 1, "kind": ...,
"tensors": {name: tensor or nested dict of tensors and numbers}, "meta": <JSON string>}``. It is
read with ``torch.load(weights_only=True)``, which refuses any pickled object other than tensors
and plain containers, so nothing in a malicious file runs.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from certnas.errors import CertnasError

FORMAT = "certnas"
VERSION = 1


class ModelFileError(CertnasError):
    """A model or checkpoint file that is missing, corrupt, unsafe or of an unknown format."""


def save_file(path: Path, kind: str, tensors: Dict[str, Any], meta: Dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, "tensors": tensors,
               "meta": json.dumps(meta, default=str)}
    handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def load_file(path: Path, kind: str = None, map_location="cpu") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(tensors, meta)`` of a certnas file; ModelFileError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelFileError(f"{path}: refused: the file holds pickled objects other than tensors "
                             f"(not a certnas file, or unsafe): {str(error).splitlines()[0]}") from None
    except Exception as error:  # weights_only: nothing ran; any other failure means an unreadable file
        raise ModelFileError(f"{path}: cannot read: the file is truncated or corrupt ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a certnas file")
    if payload.get("version") != VERSION:
        raise ModelFileError(f"{path}: unknown certnas file version {payload.get('version')!r} (this is version {VERSION})")
    if kind is not None and payload.get("kind") != kind:
        raise ModelFileError(f"{path}: holds a {payload.get('kind')!r}, expected a {kind!r}")
    try:
        meta = json.loads(payload["meta"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: corrupt metadata") from None
    return payload["tensors"], meta


def save_model(model: torch.nn.Module, path: Path, *, network: Dict[str, Any], **meta: Any) -> None:
    """Write a model file: the state dict plus ``network`` (a ``NetworkConfig`` dict, enough to
    rebuild the module) and any JSON-serialisable metadata (dataset, training settings, versions)."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    save_file(Path(path), "model", {"state_dict": state}, {"network": network, **meta})


def load_model_with_meta(path: Path, map_location="cpu") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """``(network in eval mode, metadata)`` from a model file written by ``save_model``."""
    from certnas.space.network import NetworkConfig, build_network
    tensors, meta = load_file(Path(path), kind="model", map_location=map_location)
    try:
        config = NetworkConfig.from_dict(meta["network"])
        model = build_network(config)
        model.load_state_dict(tensors["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{path}: the model does not match its own description: "
                             f"{str(error).splitlines()[0][:300]}") from None
    meta["network"] = config.to_dict()
    return model.to(map_location).eval(), meta


def load_model(path: Path, map_location="cpu") -> torch.nn.Module:
    """The network of a model file, in eval mode (BN statistics frozen, no drop-path)."""
    return load_model_with_meta(path, map_location)[0]
