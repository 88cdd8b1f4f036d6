"""The detection head beside an HF export: detection_head.safetensors + detection_head_config.json.

transformers ignores both files; bbu_jax loads them back with load_detection_head. The config
holds the head's architecture (the LLM width and the fields of its HeadSpec) and the caption
vocabulary (the LLM token ids the caption decoder scores), so the folder alone is enough for
predict_detection.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from bbu_jax.foundation.files import atomic_path, write_json_atomic
from bbu_jax.models.detection_head import DetectionHead, HeadSpec

WEIGHTS = "detection_head.safetensors"
CONFIG = "detection_head_config.json"


def _flat_params(head: DetectionHead) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(var.get_value(), np.float32)
            for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param))}


def save_detection_head(head: DetectionHead, folder: str | Path, caption_vocab: np.ndarray) -> None:
    """Write both files into ``folder`` (each atomically); the config comes from the head itself."""
    folder = Path(folder)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(_flat_params(head), str(tmp), metadata={"format": "bbu_jax"})
    config = {"llm_hidden": head.llm_hidden, **dataclasses.asdict(head.spec),
              "caption_vocab": [int(i) for i in caption_vocab]}
    write_json_atomic(folder / CONFIG, config, indent=2)


def load_detection_head(folder: str | Path) -> tuple[DetectionHead, np.ndarray]:
    """(head, caption_vocab) from an export folder; errors name the file and the key."""
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: the folder has no detection head")
    config = json.loads((folder / CONFIG).read_text())
    expected = {"llm_hidden", "caption_vocab", *(f.name for f in dataclasses.fields(HeadSpec))}
    if set(config) != expected:
        raise ValueError(f"{folder / CONFIG}: missing keys {sorted(expected - set(config))}, "
                         f"unknown keys {sorted(set(config) - expected)}")
    vocab = np.asarray(config.pop("caption_vocab"), np.int32)
    llm_hidden = config.pop("llm_hidden")
    head = DetectionHead(HeadSpec(**config), llm_hidden=llm_hidden, rngs=nnx.Rngs(0))
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
