"""The detection head beside an HF export: detection_head.safetensors + detection_head_config.json.

transformers ignores both files; bbu_jax loads them back with load_detection_head. The config
holds the head's constructor arguments and the caption vocabulary (the LLM token ids the caption
decoder scores), so the folder alone is enough for predict_detection.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from bbu_jax.models.detection_head import DetectionHead

WEIGHTS = "detection_head.safetensors"
CONFIG = "detection_head_config.json"


def _flat_params(head: DetectionHead) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(var.get_value(), np.float32)
            for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param))}


def save_detection_head(head: DetectionHead, folder: str | Path, head_config: dict,
                        caption_vocab: np.ndarray) -> None:
    """Write both files into ``folder`` (each atomically)."""
    folder = Path(folder)
    tmp = folder / f".{WEIGHTS}.{os.getpid()}.tmp"
    save_file(_flat_params(head), str(tmp), metadata={"format": "bbu_jax"})
    os.replace(tmp, folder / WEIGHTS)
    config = {**head_config, "caption_vocab": [int(i) for i in caption_vocab]}
    tmp = folder / f".{CONFIG}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, folder / CONFIG)


def load_detection_head(folder: str | Path) -> tuple[DetectionHead, np.ndarray]:
    """(head, caption_vocab) from an export folder; errors name the file and the key."""
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: the folder has no detection head")
    config = json.loads((folder / CONFIG).read_text())
    vocab = np.asarray(config.pop("caption_vocab"), np.int32)
    head = DetectionHead(**config, rngs=nnx.Rngs(0))
    saved = load_file(str(folder / WEIGHTS))
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param)):
        key = ".".join(map(str, path))
        if key not in saved:
            raise KeyError(f"{folder / WEIGHTS}: missing tensor {key!r}")
        value = saved.pop(key)
        if value.shape != var.get_value().shape:
            raise ValueError(f"{folder / WEIGHTS}: tensor {key!r} has shape {value.shape}, "
                             f"expected {var.get_value().shape} (from {CONFIG})")
        flat.append((path, var.replace(value)))
    if saved:
        raise KeyError(f"{folder / WEIGHTS}: unexpected tensors {sorted(saved)[:10]}")
    nnx.update(head, nnx.from_flat_state(flat))
    return head, vocab
