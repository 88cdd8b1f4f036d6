"""HF safetensors <-> NNX state for Qwen2.5-VL (Tunix-style mapping, kept apart from the model).

Every NNX param path maps to one HF key (stacked layers to one key per layer). Params keep HF's
layouts (Linear weights (out, in), as torch stores them), so a tensor moves as a cast: the Conv3d
patch embedding (D, C, T, 14, 14) is only flattened to a (D, C*T*14*14) Linear weight whose columns
follow the processor's (C, T, 14, 14) patch layout, per-layer tensors are stacked on a leading
layer axis. Two HF key layouts exist: "legacy" (released Qwen checkpoints: ``model.layers.*``,
``visual.*``) and "v5" (transformers 5: ``model.language_model.*``, ``model.visual.*``); both load,
and a missing ``lm_head.weight`` means tied embeddings.
"""
from __future__ import annotations

import functools
import json
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from bbu_jax.foundation.files import StoredTensor, TensorSource, map_tensor, safetensors_tensors

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
        if p in ("mlp_0", "mlp_2"):
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
        return dict.fromkeys(safetensors_tensors(single), single)
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def detect_layout(keys) -> str:
    return "v5" if any(k.startswith(("model.language_model.", "model.visual.")) for k in keys) else "legacy"


def abstract_model(cfg: Qwen25VLConfig, dtype=jnp.float32, **model_kw) -> Qwen25VL:
    return nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, **model_kw))


def from_hf(hf_dir: str | Path, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
            compute_dtype=jnp.float32, attention_impl: str = "xla", remat: str = "none",
            scan_layers: bool = True) -> Qwen25VL:
    """Load an HF Qwen2.5-VL folder, params in ``dtype``. With ``mesh``, every param goes straight
    to its sharding (abstract model -> shardings from logical names -> each device receives only its
    shard of each tensor -> merge).

    One param at a time, each file's bytes read once (``_load_param``), no compile per
    tensor: on one CPU device memory beyond the params is one mapped tensor, elsewhere at most
    ``LOAD_CHUNK_BYTES`` more."""
    from bbu_jax.foundation.sharding import param_shardings

    hf_dir = check_model_dir(hf_dir)
    cfg = Qwen25VLConfig.from_file(hf_dir / "config.json")
    files = weight_files(hf_dir)
    layout = detect_layout(files)
    stored = stored_tensors(files)
    graphdef, abs_state = nnx.split(abstract_model(cfg, dtype, compute_dtype=compute_dtype,
                                                   attention_impl=attention_impl, remat=remat,
                                                   scan_layers=scan_layers))
    shardings = None if mesh is None else nnx.to_flat_state(param_shardings(abs_state, mesh))
    shardings = None if shardings is None else {p: v.get_value() for p, v in shardings}
    used: set[str] = set()

    def tensor(key: str, expected: tuple[int, ...]) -> StoredTensor:
        if key not in stored:
            raise KeyError(f"{hf_dir}: missing tensor {key!r}")
        t = stored[key]
        if t.shape != tuple(expected):
            raise ValueError(f"{t.file}: tensor {key!r} has shape {t.shape}, expected {tuple(expected)}")
        used.add(key)
        return t

    flat = []
    for path, var in nnx.to_flat_state(abs_state):
        shape = tuple(var.shape)
        stacked = _is_stacked(path)
        hf_shape = _hf_shape(cfg, path, shape[1:] if stacked else shape)
        keys = [hf_key(path, i, layout) for i in range(shape[0])] if stacked else [hf_key(path, None, layout)]
        value = _load_param([tensor(k, hf_shape) for k in keys], stacked, shape,
                            np.dtype(var.dtype), None if shardings is None else shardings[path])
        flat.append((path, var.replace(value)))
    unknown = sorted(set(files) - used - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if unknown:
        raise KeyError(f"{hf_dir}: unexpected tensors {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def stored_tensors(files: dict[str, Path]) -> dict[str, StoredTensor]:
    """Where each tensor of ``weight_files`` lies (each file's header read once)."""
    out = {}
    for file in sorted(set(files.values())):
        out.update((k, t) for k, t in safetensors_tensors(file).items() if files.get(k) == file)
    return out


# Beyond the params, host memory holds at most this much of a param being placed on devices that
# cannot take its host buffer as it is (a mesh, an accelerator): larger stacks go in chunks of layers.
LOAD_CHUNK_BYTES = 1 << 30
_BF16 = np.dtype(jnp.bfloat16)
_PARALLEL_BYTES = 1 << 20  # smaller tensors are copied by the calling thread
# threads that copy a tensor's rows; beyond a few, memory bandwidth rather than cores is the limit
_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@functools.cache
def _copy_pool() -> ThreadPoolExecutor:
    """The threads that copy tensors' rows, started once and kept (idle between loads)."""
    return ThreadPoolExecutor(_THREADS, thread_name_prefix="param-copy")


def _host_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised host array on fresh pages of its own, freed with it: page-aligned, so XLA's
    CPU client takes it as it is, and of ordinary pages (what torch's allocator gets), where numpy
    asks for huge ones for a large array, which a kernel short of free 2 MiB blocks (a VM's, often)
    first compacts memory for, at several times the cost of the faults saved."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype).reshape(shape)


def _copy_cast(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = src`` in dst's dtype, bit for bit what ``astype`` gives: bfloat16 -> float32 as
    the bit shift it is and equal dtypes as plain integers (numpy's loops for the bfloat16 extension
    type are several times slower); other pairs through float32, as any cast to bfloat16 is."""
    if src.dtype == dst.dtype:
        bits = f"u{src.dtype.itemsize}"
        np.copyto(dst.view(bits), src.view(bits))
    elif src.dtype == _BF16 and dst.dtype == np.float32:
        np.left_shift(src.view(np.uint16), 16, out=dst.view(np.uint32), dtype=np.uint32)
    elif np.float32 in (src.dtype, dst.dtype):
        np.copyto(dst, src, casting="unsafe")
    else:
        np.copyto(dst, src.astype(np.float32), casting="unsafe")


def _copy_into(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[...] = src`` (of equal size; reshaped to dst's shape) in dst's dtype, the rows split
    between ``_copy_pool``'s threads (numpy lets go of the GIL inside each copy)."""
    src = src.reshape(dst.shape)
    if src.ndim == 0 or src.nbytes < _PARALLEL_BYTES:
        _copy_cast(src, dst)
        return
    step = -(-len(src) // _THREADS)
    pool = _copy_pool()
    for done in [pool.submit(_copy_cast, src[lo:lo + step], dst[lo:lo + step]) for lo in range(0, len(src), step)]:
        done.result()


@functools.partial(jax.jit, donate_argnums=0)
def _put_layers(out: jax.Array, layers: jax.Array, start) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(out, layers, start, axis=0)


def _load_param(tensors: list[StoredTensor], stacked: bool, shape: tuple[int, ...],
                dtype: np.dtype, sharding: NamedSharding | None) -> jax.Array:
    """One param from its stored tensors (one per layer when ``stacked``), on ``sharding`` (None:
    the default device).

    Each tensor is read from its mapped pages straight into the param's dtype in an
    aligned host buffer: on a single CPU device that buffer becomes the param (no copy); elsewhere
    each device receives its shards of it, a chunk of layers at a time."""

    def host(chunk: list[StoredTensor]) -> np.ndarray:
        buf = _host_empty((len(chunk), *shape[1:]) if stacked else shape, dtype)
        for i, t in enumerate(chunk):
            _copy_into(map_tensor(t), buf[i] if stacked else buf)
        return buf

    # device_put is asynchronous: waiting frees the host buffer before the next one is filled
    if (sharding is None and jax.default_backend() == "cpu") or not stacked:
        return jax.block_until_ready(jax.device_put(host(tensors), sharding))
    per_layer = tensors[0].nbytes + math.prod(shape[1:]) * dtype.itemsize
    step = max(1, LOAD_CHUNK_BYTES // per_layer)
    if step >= len(tensors):
        return jax.block_until_ready(jax.device_put(host(tensors), sharding))
    out = jnp.zeros(shape, dtype, device=sharding)
    # a chunk's layer count need not divide the mesh axis the whole stack is split over, if any
    chunk_sharding = None if sharding is None else NamedSharding(
        sharding.mesh, PartitionSpec(None, *tuple(sharding.spec)[1:]))
    for start in range(0, len(tensors), step):
        chunk = jax.device_put(host(tensors[start:start + step]), chunk_sharding)
        out = jax.block_until_ready(_put_layers(out, chunk, start))
    return out


def _hf_shape(cfg: Qwen25VLConfig, path, nnx_shape: tuple[int, ...]) -> tuple[int, ...]:
    return _patch_embed_shape(cfg) if tuple(map(str, path[:2])) == ("visual", "patch_embed") else nnx_shape


def hf_tensors(model: Qwen25VL, layout: str = "legacy", dtype=np.float32) -> dict[str, TensorSource]:
    """The HF tensors of ``model`` in the given key layout and ``dtype``, each made (cast) only when
    written; no lm_head when embeddings are tied. A param is fetched from its devices when its first
    tensor is made and dropped after its last (they come in order)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    dtype = np.dtype(dtype)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    @functools.lru_cache(maxsize=1)
    def fetched(path) -> np.ndarray:
        return np.asarray(jax.device_get(params[path].get_value()))

    def fill(path, layer: int | None, out: np.ndarray) -> None:
        value = fetched(path)
        _copy_into(value if layer is None else value[layer], out)

    out = {}
    for path, var in params.items():
        stacked = _is_stacked(path)
        hf_shape = _hf_shape(model.config, path, var.shape[1:] if stacked else var.shape)
        for i in range(var.shape[0]) if stacked else [None]:
            out[hf_key(path, i, layout)] = TensorSource(hf_shape, dtype, functools.partial(fill, path, i))
    return out


def to_hf_state_dict(model: Qwen25VL, layout: str = "legacy", dtype=np.float32) -> dict[str, np.ndarray]:
    """``hf_tensors`` made, all in memory (numpy)."""
    return {k: t.array() for k, t in hf_tensors(model, layout, dtype).items()}
