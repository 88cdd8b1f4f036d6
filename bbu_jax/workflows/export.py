"""HF weights in and out: an HF Qwen2.5-VL folder <-> a bbu_jax params checkpoint <-> an HF export.

A params checkpoint is a folder: params/ (orbax, a pure dict of arrays, restorable onto any mesh;
restoring casts to the model's float32 params, so storing bfloat16 is lossless for the released bf16
checkpoints and halves the conversion's memory), hf/ (the source's config.json, tokenizer and
processor files, so an export needs nothing else) and bbu_jax.json (what this is, where it came
from). A training run's checkpoint step or run folder exports the same way: its params, head and
settings come from the step (bbu_jax.inference.loading), so any step of a run, one that stopped
early included, becomes an HF folder that carries how it was trained. convert_weights/hf_to_flax.py
and flax_to_hf.py are the command lines over these functions.

Every output folder is written atomically (foundation.files.atomic_dir): a non-empty one is replaced
only with ``overwrite``, and never one that is, contains or lies inside the folder it is made from.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from transformers import AutoTokenizer

from bbu_jax.foundation.files import (atomic_dir, copy_side_files, prepare_out_dir, save_safetensors_shards,
                                      write_json_atomic, write_text_atomic)
from bbu_jax.inference.generate import default_stop_ids
from bbu_jax.inference.loading import find_step, load_trained
from bbu_jax.inference.settings import Settings
from bbu_jax.models.detection_head import DetectionHead
from bbu_jax.models.detection_head_files import save_detection_head
from bbu_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, from_hf, hf_tensors
from bbu_jax.models.qwen2_5_vl.params import abstract_model
from bbu_jax.models.qwen2_5_vl.processing import PROCESSOR_FILE, with_pixel_limits
from bbu_jax.training.checkpointing import arrays_handler
from bbu_jax.workflows.model_card import model_card

FORMAT = "bbu_jax.params"
# 2: Linear weights in torch's (out, in) layout, named "weight" (1: (in, out) "kernel" arrays)
VERSION = 2
META_FILE = "bbu_jax.json"
# dtype name -> (dtype the model is loaded in, dtype an export stores)
LOAD_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def save_params_checkpoint(model: nnx.Module, out: Path, hf_files_from: Path, source: str, *,
                           overwrite: bool = False) -> Path:
    """Write ``model``'s params + the HF side files atomically to ``out``."""
    with atomic_dir(out, overwrite=overwrite, sources=[hf_files_from]) as tmp:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        ocp.Checkpointer(arrays_handler(params)).save((tmp / "params").absolute(), args=ocp.args.PyTreeSave(params))
        (tmp / "hf").mkdir()
        shutil.copy2(hf_files_from / "config.json", tmp / "hf" / "config.json")
        copy_side_files(hf_files_from, tmp / "hf")
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "source": source}, indent=2))
    return Path(out)


def convert(hf_dir: str | Path, out: str | Path, dtype: str = "float32", *, overwrite: bool = False) -> Path:
    """hf_to_flax: the HF folder ``hf_dir`` as a params checkpoint in ``out``."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: not a folder")
    if dtype not in LOAD_DTYPES:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(LOAD_DTYPES)}")
    prepare_out_dir(out, overwrite=overwrite, sources=[hf_dir])  # a refusal comes before the loading
    model = from_hf(hf_dir, dtype=LOAD_DTYPES[dtype])
    return save_params_checkpoint(model, Path(out), hf_dir, source=str(hf_dir.absolute()), overwrite=overwrite)


def load_params_checkpoint(checkpoint: str | Path) -> tuple[Qwen25VL, Path]:
    """The model stored by hf_to_flax (or a training export) and its folder of HF side files."""
    ckpt = Path(checkpoint).absolute()
    meta_file = ckpt / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{ckpt}: no {META_FILE}; not a bbu_jax params checkpoint "
                                f"(made by convert_weights.hf_to_flax or a training run's export)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{meta_file}: version {meta.get('version')!r} of {FORMAT}, this bbu_jax reads "
                         f"version {VERSION}; make the checkpoint again from its HF source with hf_to_flax")
    hf_files = ckpt / "hf"
    cfg = Qwen25VLConfig.from_file(hf_files / "config.json")
    graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    restored = ocp.StandardCheckpointer().restore(ckpt / "params", nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest), hf_files


def export(model: Qwen25VL, out: str | Path, base_hf_dir: str | Path, *, dtype: str = "float32",
           max_shard_bytes: int | None = 5 * 2**30, head: DetectionHead | None = None,
           caption_vocab: np.ndarray | None = None, settings: Settings | None = None,
           metrics: Mapping[str, Any] | None = None, overwrite: bool = False,
           sources: Sequence[str | Path] = ()) -> Path:
    """Write an HF folder for ``model`` with ``base_hf_dir``'s tokenizer and processor files and,
    given a ``head``, detection_head.safetensors + its config (architecture and caption vocabulary).

    With the run's ``settings`` the folder also carries them (`settings.SETTINGS_FILE`), a processor
    config that resizes as training did, a generation config with training's end tokens, and a
    model card (README.md) quoting ``metrics``.
    ``sources``: further folders the model was read from, protected like ``base_hf_dir``.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(EXPORT_DTYPES)}")
    base = Path(base_hf_dir)
    with atomic_dir(out, overwrite=overwrite, sources=[base, *sources]) as tmp:
        save_safetensors_shards(hf_tensors(model, layout="legacy", dtype=EXPORT_DTYPES[dtype]), tmp, max_shard_bytes)
        copied = copy_side_files(base, tmp)
        if "tokenizer_config.json" not in copied and "tokenizer.json" not in copied:
            raise FileNotFoundError(f"{base}: no tokenizer files to copy into the export")
        config = model.config.to_hf_dict()
        config["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        if head is not None:
            save_detection_head(head, tmp, caption_vocab)
        if settings is not None:
            write_trained_side_files(tmp, settings, metrics or {})
    return Path(out)


def write_trained_side_files(folder: Path, settings: Settings, metrics: Mapping[str, Any]) -> None:
    """The settings record, the processor and generation configs of training, the model card."""
    settings.write(folder)
    processor = folder / PROCESSOR_FILE
    base = json.loads(processor.read_text(encoding="utf-8")) if processor.is_file() else {}
    write_json_atomic(processor, with_pixel_limits(base, settings.min_pixels, settings.max_pixels), indent=2)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    stop = default_stop_ids(tokenizer)
    generation = folder / "generation_config.json"
    base = json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[-1]
    write_json_atomic(generation, {**base, "eos_token_id": list(stop), "pad_token_id": pad}, indent=2)
    write_text_atomic(folder / "README.md", model_card(settings, metrics))


def export_checkpoint(checkpoint: str | Path, out: str | Path, base_hf_dir: str | Path | None = None, *,
                      dtype: str = "float32", max_shard_bytes: int | None = 5 * 2**30,
                      overwrite: bool = False) -> Path:
    """flax_to_hf: ``checkpoint`` as an HF folder in ``out``. ``checkpoint`` is a params checkpoint
    of hf_to_flax, a training run's checkpoint step (RUN/checkpoints/STEP) or a run folder (its
    newest readable step); tokenizer and processor files come from ``base_hf_dir``, by default the
    params checkpoint's hf/ or the base model the run's settings name."""
    sources = [checkpoint, *([base_hf_dir] if base_hf_dir is not None else [])]
    prepare_out_dir(out, overwrite=overwrite, sources=sources)  # a refusal comes before the loading
    if (Path(checkpoint) / META_FILE).is_file():
        model, hf_files = load_params_checkpoint(checkpoint)
        return export(model, out, base_hf_dir or hf_files, dtype=dtype, max_shard_bytes=max_shard_bytes,
                      overwrite=overwrite, sources=[checkpoint])
    if find_step(checkpoint) is None:
        raise FileNotFoundError(f"{checkpoint}: neither a params checkpoint ({META_FILE}), a checkpoint step "
                                f"(state/, meta/) nor a run folder with checkpoints/")
    trained = load_trained(checkpoint, dtype="float32", attention_impl="xla")  # a run: its newest readable step
    step = trained.source
    metrics = _metrics_at(step.parent.parent / "metrics.jsonl", int(step.name))
    return export(trained.model, out, base_hf_dir or trained.files, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  head=trained.head, caption_vocab=trained.caption_vocab, settings=trained.settings,
                  metrics=metrics, overwrite=overwrite, sources=[checkpoint])


def _metrics_at(metrics_jsonl: Path, step: int) -> dict[str, float]:
    """The last value of every metric logged up to ``step`` (for the model card)."""
    values: dict[str, float] = {}
    if metrics_jsonl.is_file():
        for line in metrics_jsonl.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", step + 1) <= step:
                values.update(row)
    return values


def export_trained(modules, out: str | Path, settings: Settings, metrics: Mapping[str, Any], *,
                   overwrite: bool) -> Path:
    """HF folder of a trained model (transformers loads it) plus its detection head, settings and card."""
    return export(modules["model"], out, settings.base_model, head=modules.get("head"),
                  caption_vocab=settings.caption_vocab_array(), settings=settings, metrics=metrics,
                  overwrite=overwrite)
