"""Weights as safetensors next to a JSON with the configs and the training provenance (no pickles).

``save_model(path, model, meta)`` writes ``path`` (``.safetensors``) whose metadata holds the JSON; a copy of
the JSON is written beside it (``path.with_suffix(".json")``) for people to read.  ``load_model`` rebuilds
the network from the stored :class:`NetConfig` and never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from kmotion.network.model import KMotionNet, NetConfig
from kmotion.physics.validate import InputError

FORMAT = "kmotion-net/1"


def save_model(path: str | Path, model: KMotionNet, meta: dict[str, Any] | None = None) -> Path:
    """Save weights and ``{"format", "net", **meta}`` (meta: study config, target scale, provenance)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"format": FORMAT, "net": model.config.to_dict(), **(meta or {})}
    text = json.dumps(info, indent=2, sort_keys=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"kmotion": text})
    path.with_suffix(".json").write_text(text + "\n")
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON stored in a weights file (raises :class:`InputError` for a missing or corrupt file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors model file ({exc})") from exc
    if "kmotion" not in meta:
        raise InputError(f"{path}: safetensors file without kmotion metadata (field 'kmotion' missing)")
    try:
        info = json.loads(meta["kmotion"])
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: kmotion metadata is not valid JSON ({exc})") from exc
    if info.get("format") != FORMAT:
        raise InputError(f"{path}: format: expected {FORMAT!r}, got {info.get('format')!r}")
    return info


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[KMotionNet, dict[str, Any]]:
    """Rebuild the network from its stored config and load the weights (eval mode)."""
    info = read_meta(path)
    try:
        model = KMotionNet(NetConfig.from_dict(info["net"]))
        state = load_file(str(path), device="cpu")
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise InputError(f"{path}: weights do not match the stored network config ({exc})") from exc
    return model.to(device).eval(), info
