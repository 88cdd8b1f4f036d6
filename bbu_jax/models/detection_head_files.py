"""The detection head beside an HF export: detection_head.safetensors + detection_head_config.json.

transformers ignores both files; bbu_jax loads them back with load_detection_head. The config
holds the head's architecture (the LLM width and the fields of its HeadSpec), the caption
vocabulary (the LLM token ids the caption decoder scores), so the folder alone is enough for
predict_detection, and the fingerprint of the model it was trained on ("model", see
model_fingerprint). A head reads that model's hidden states and token ids: beside another model it
either fails deep in a matmul (another width) or gives plausible wrong numbers (same shapes, other
weights or vocabulary), so check_detection_head refuses any model but its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from bbu_jax.foundation.files import atomic_path, write_json_atomic
from bbu_jax.models.detection_head import DetectionHead, HeadSpec
from bbu_jax.models.qwen2_5_vl.config import Qwen25VLConfig, check_model_dir
from bbu_jax.models.qwen2_5_vl.params import weight_files

WEIGHTS = "detection_head.safetensors"
CONFIG = "detection_head_config.json"


def _flat_params(head: DetectionHead) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(var.get_value(), np.float32)
            for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param))}


# Norm weights of every part a run trains (decoder, vision blocks, merger): tiny to read, and
# training moves them, so they tell a fine-tune from its base or a sibling of the same shape.
_NORM_KEY = re.compile(r"(norm|ln_q)[^.]*\.weight$")
# transformers 5's key layout -> the released checkpoints' one, so both layouts hash alike.
_LAYOUT_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
# How check_detection_head names a differing hash.
_DIFFERENCE = {"architecture_sha256": "other architecture", "tokenizer_sha256": "other tokenizer vocabulary",
               "norms_sha256": "other weights"}


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _tokenizer_vocab(folder: Path) -> dict[str, int]:
    """token -> id from whichever tokenizer files the folder has (tokenizer.json, or vocab.json),
    plus the added tokens, so folders with either form of the same tokenizer agree."""
    vocab: dict[str, int] = {}
    if (folder / "tokenizer.json").is_file():
        tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab.update(tok["model"]["vocab"])
        vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    elif (folder / "vocab.json").is_file():
        vocab.update(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    if (folder / "tokenizer_config.json").is_file():
        added = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("added_tokens_decoder")
        vocab.update({t["content"]: int(i) for i, t in (added or {}).items()})
    return vocab


def _norms_sha256(folder: Path) -> str:
    """Hash of the norm weights rounded to bfloat16, so a bfloat16 copy of the same weights agrees."""
    by_file: dict[Path, list[str]] = {}
    for key, file in weight_files(folder).items():
        if _NORM_KEY.search(key):
            by_file.setdefault(file, []).append(key)
    digests = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for key in keys:
                name = key
                for v5, legacy in _LAYOUT_PREFIXES:
                    name = legacy + name[len(v5):] if name.startswith(v5) else name
                value = np.asarray(f.get_tensor(key), np.float32).astype(jnp.bfloat16)
                digests[name] = hashlib.sha256(value.tobytes()).hexdigest()
    return _sha256(digests)


def model_fingerprint(model_dir: str | Path) -> dict:
    """What identifies the model an HF folder holds, for a head trained on it: the text width and
    vocabulary size (what its shapes depend on), and hashes of the architecture (the config.json
    fields bbu_jax models), of the tokenizer's vocabulary and of the norm weights."""
    folder = check_model_dir(model_dir, tokenizer=True)
    config = Qwen25VLConfig.from_file(folder / "config.json")
    architecture = dataclasses.asdict(config)
    architecture.pop("extra")
    return {"text_hidden_size": config.text.hidden_size, "vocab_size": config.text.vocab_size,
            "architecture_sha256": _sha256(architecture), "tokenizer_sha256": _sha256(_tokenizer_vocab(folder)),
            "norms_sha256": _norms_sha256(folder)}


def save_detection_head(head: DetectionHead, folder: str | Path, caption_vocab: np.ndarray) -> None:
    """Write both files into ``folder`` (each atomically); the config comes from the head itself.
    A head is saved beside the model it was trained with: when ``folder`` holds that model
    (config.json), its fingerprint is recorded for check_detection_head."""
    folder = Path(folder)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(_flat_params(head), str(tmp), metadata={"format": "bbu_jax"})
    config = {"llm_hidden": head.llm_hidden, **dataclasses.asdict(head.spec),
              "caption_vocab": [int(i) for i in caption_vocab]}
    if (folder / "config.json").is_file():
        config["model"] = model_fingerprint(folder)
    write_json_atomic(folder / CONFIG, config, indent=2)


def check_head_fits_model(head: DetectionHead, config: Qwen25VLConfig, caption_vocab: np.ndarray) -> None:
    """The shapes a head shares with a model: its hidden-state width and the token ids it scores."""
    if head.llm_hidden != config.text.hidden_size:
        raise ValueError(f"the detection head reads {head.llm_hidden}-wide hidden states but the model's are "
                         f"{config.text.hidden_size} wide: the head belongs to another model")
    if len(caption_vocab) and int(np.max(caption_vocab)) >= config.text.vocab_size:
        raise ValueError(f"the detection head's caption vocabulary has token id {int(np.max(caption_vocab))}, "
                         f"outside the model's {config.text.vocab_size} tokens: the head belongs to another model")


def check_detection_head(folder: str | Path, model_dir: str | Path | None = None) -> None:
    """Refuses a head trained on another model than ``model_dir``'s (default: the folder the head
    lies in) with one line naming both. A head saved before fingerprints were recorded is checked
    for its width and token ids only, with a warning."""
    folder = Path(folder)
    model_dir = folder if model_dir is None else Path(model_dir)
    saved = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    ours = model_fingerprint(model_dir)
    theirs = saved.get("model")
    top_id = max(saved.get("caption_vocab") or [0])
    differ = []
    if saved.get("llm_hidden") != ours["text_hidden_size"]:
        differ.append(f"it reads {saved.get('llm_hidden')}-wide hidden states, the model's are "
                      f"{ours['text_hidden_size']} wide")
    if top_id >= ours["vocab_size"]:
        differ.append(f"it scores token id {top_id}, the model has {ours['vocab_size']} tokens")
    if not differ and theirs is not None:
        differ = [_DIFFERENCE.get(k, f"{k}: the head's {theirs.get(k)}, the model's {v}")
                  for k, v in ours.items() if theirs.get(k) != v]
    if differ:
        raise ValueError(f"{folder / CONFIG}: the head was trained on another model than {model_dir} "
                         f"({'; '.join(differ)})")
    if theirs is None:
        warnings.warn(f"{folder / CONFIG} records no model fingerprint (saved by an older bbu_jax): only its "
                      f"width and token ids could be checked against {model_dir}", stacklevel=2)


def load_detection_head(folder: str | Path, *, dtype=jnp.float32, attention_impl: str = "xla"
                        ) -> tuple[DetectionHead, np.ndarray]:
    """(head, caption_vocab) from an export folder, params and compute in ``dtype``; errors name
    the file and the key."""
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: the folder has no detection head")
    config = json.loads((folder / CONFIG).read_text())
    expected = {"llm_hidden", "caption_vocab", *(f.name for f in dataclasses.fields(HeadSpec))}
    if set(config) - {"model"} != expected:  # "model": absent from files saved before fingerprints
        raise ValueError(f"{folder / CONFIG}: missing keys {sorted(expected - set(config))}, "
                         f"unknown keys {sorted(set(config) - expected - {'model'})}")
    config.pop("model", None)
    vocab = np.asarray(config.pop("caption_vocab"), np.int32)
    llm_hidden = config.pop("llm_hidden")
    head = DetectionHead(HeadSpec(**config), llm_hidden=llm_hidden, attention_impl=attention_impl, dtype=dtype,
                         param_dtype=dtype, rngs=nnx.Rngs(0))
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
        flat.append((path, var.replace(jnp.asarray(value, dtype))))
    if saved:
        raise KeyError(f"{folder / WEIGHTS}: unexpected tensors {sorted(saved)[:10]}")
    nnx.update(head, nnx.from_flat_state(flat))
    return head, vocab
