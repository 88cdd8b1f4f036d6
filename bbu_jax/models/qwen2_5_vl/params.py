"""HF safetensors <-> NNX state for Qwen2.5-VL (Tunix-style mapping, kept apart from the model).

Every NNX param path maps to one HF key (stacked layers to one key per layer) plus a transform:
torch Linear weights are transposed, the Conv3d patch embedding (D, C, T, 14, 14) becomes a
(C*T*14*14, D) kernel whose rows follow the processor's (C, T, 14, 14) patch layout, per-layer
tensors are stacked on a leading layer axis. Two HF key layouts exist: "legacy" (released Qwen
checkpoints: ``model.layers.*``, ``visual.*``) and "v5" (transformers 5: ``model.language_model.*``,
``model.visual.*``); both load, and a missing ``lm_head.weight`` means tied embeddings.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from bbu_jax.models.qwen2_5_vl.config import Qwen25VLConfig, check_model_dir
from bbu_jax.models.qwen2_5_vl.model import Qwen25VL

STACKED = ("blocks", "layers")  # NNX module names whose params carry a leading layer axis
LAYOUTS = ("legacy", "v5")


def hf_key(path: tuple[str, ...], layer: int | None = None, layout: str = "legacy") -> str:
    """HF key of an NNX param path (``layer`` for stacked params)."""
    parts = [str(p) for p in path]
    if parts == ["lm_head"]:
        return "lm_head.weight"
    out = []
    for p in parts:
        if p == "kernel":
            p = "weight"
        elif p in ("mlp_0", "mlp_2"):
            p = "mlp." + p[-1]
        out.append(p)
        if p in STACKED:
            out.append(str(layer))
    if parts[:2] == ["visual", "patch_embed"]:
        out.insert(2, "proj")
    tower = out[0]
    prefix = {("legacy", "visual"): "visual", ("legacy", "language_model"): "model",
              ("v5", "visual"): "model.visual", ("v5", "language_model"): "model.language_model"}
    if (layout, tower) not in prefix:
        raise ValueError(f"no HF key for param {'/'.join(parts)} (layout {layout!r})")
    return ".".join([prefix[layout, tower], *out[1:]])


def _is_stacked(path) -> bool:
    return any(str(p) in STACKED for p in path)


def _to_nnx(path, tensor: np.ndarray) -> np.ndarray:
    if str(path[-1]) != "kernel":
        return tensor
    if tuple(map(str, path[:2])) == ("visual", "patch_embed"):
        return tensor.reshape(tensor.shape[0], -1).T
    return tensor.T


def _to_hf(path, value: np.ndarray, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
    if str(path[-1]) != "kernel":
        return value
    if tuple(map(str, path[:2])) == ("visual", "patch_embed"):
        return value.T.reshape(hf_shape)
    return value.T


def _patch_embed_shape(cfg: Qwen25VLConfig) -> tuple[int, ...]:
    v = cfg.vision
    return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """HF key -> safetensors file, from model.safetensors or a sharded index."""
    index = hf_dir / "model.safetensors.index.json"
    single = hf_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from e
        files = {k: hf_dir / f for k, f in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names missing files: {missing}")
        return files
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def detect_layout(keys) -> str:
    return "v5" if any(k.startswith(("model.language_model.", "model.visual.")) for k in keys) else "legacy"


def abstract_model(cfg: Qwen25VLConfig, dtype=jnp.float32, **model_kw) -> Qwen25VL:
    return nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, **model_kw))


def from_hf(hf_dir: str | Path, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
            compute_dtype=jnp.float32, attention_impl: str = "xla", remat: str = "none",
            scan_layers: bool = True) -> Qwen25VL:
    """Load an HF Qwen2.5-VL folder. With ``mesh``, every tensor goes straight to its sharding
    (abstract model -> shardings from logical names -> device_put per tensor -> merge)."""
    from bbu_jax.foundation.sharding import param_shardings

    hf_dir = check_model_dir(hf_dir)
    cfg = Qwen25VLConfig.from_file(hf_dir / "config.json")
    files = weight_files(hf_dir)
    layout = detect_layout(files)
    graphdef, abs_state = nnx.split(abstract_model(cfg, dtype, compute_dtype=compute_dtype,
                                                   attention_impl=attention_impl, remat=remat,
                                                   scan_layers=scan_layers))
    shardings = None if mesh is None else nnx.to_flat_state(param_shardings(abs_state, mesh))
    shardings = None if shardings is None else {p: v.get_value() for p, v in shardings}
    handles: dict[Path, object] = {}
    used: set[str] = set()

    def read(key: str, expected: tuple[int, ...]) -> np.ndarray:
        if key not in files:
            raise KeyError(f"{hf_dir}: missing tensor {key!r}")
        f = handles.get(files[key]) or handles.setdefault(files[key], safe_open(files[key], framework="numpy"))
        t = f.get_tensor(key)
        if tuple(t.shape) != tuple(expected):
            raise ValueError(f"{files[key]}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(expected)}")
        used.add(key)
        return t

    flat = []
    for path, var in nnx.to_flat_state(abs_state):
        shape = tuple(var.shape)
        per_layer = shape[1:] if _is_stacked(path) else shape
        hf_shape = _hf_shape(cfg, path, per_layer)
        if _is_stacked(path):
            value = np.stack([_to_nnx(path, read(hf_key(path, i, layout), hf_shape)) for i in range(shape[0])])
        else:
            value = _to_nnx(path, read(hf_key(path, None, layout), hf_shape))
        value = value.astype(np.float32).astype(var.dtype) if value.dtype != var.dtype else value
        value = jax.device_put(value, shardings[path]) if shardings is not None else jnp.asarray(value)
        flat.append((path, var.replace(value)))
    unknown = sorted(set(files) - used - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if unknown:
        raise KeyError(f"{hf_dir}: unexpected tensors {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _hf_shape(cfg: Qwen25VLConfig, path, nnx_shape: tuple[int, ...]) -> tuple[int, ...]:
    if str(path[-1]) != "kernel":
        return nnx_shape
    if tuple(map(str, path[:2])) == ("visual", "patch_embed"):
        return _patch_embed_shape(cfg)
    return nnx_shape[::-1]


def to_hf_state_dict(model: Qwen25VL, layout: str = "legacy", dtype=np.float32) -> dict[str, np.ndarray]:
    """HF state dict (numpy, ``dtype``) in the given key layout; no lm_head when embeddings are tied."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(jax.device_get(var.get_value()), np.float32)
        per_layer = value.shape[1:] if _is_stacked(path) else value.shape
        hf_shape = _hf_shape(model.config, path, per_layer)
        if _is_stacked(path):
            for i in range(value.shape[0]):
                out[hf_key(path, i, layout)] = _to_hf(path, value[i], hf_shape).astype(dtype)
        else:
            out[hf_key(path, None, layout)] = _to_hf(path, value, hf_shape).astype(dtype)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
