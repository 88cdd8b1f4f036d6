"""Qwen2.5-VL configuration, read from (and written back to) an HF config.json.

transformers 5 nests the decoder fields under ``text_config``; older checkpoints (the released
Qwen2.5-VL ones) keep them at the top level. Both are read; ``to_hf_dict`` writes the nested layout
with the decoder fields also mirrored at the top level, which every transformers version loads.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 2048
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    tie_word_embeddings: bool = True
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    # Fields of the source config.json we do not model, kept so that export round-trips them.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "Qwen25VLConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (expected one of "
                             f"{SUPPORTED_MODEL_TYPES})")
        text = dict(d.get("text_config") or {})
        for f in dataclasses.fields(TextConfig):  # flat layout: decoder fields at the top level
            if f.name not in text and f.name in d:
                text[f.name] = d[f.name]
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or d.get("rope_scaling") or {})
        if "rope_theta" not in text:
            text["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", TextConfig.rope_theta))
        if "mrope_section" in rope:
            text["mrope_section"] = tuple(rope["mrope_section"])
        if text.get("num_key_value_heads") is None:
            text["num_key_value_heads"] = text.get("num_attention_heads", TextConfig.num_attention_heads)
        vision = dict(d.get("vision_config") or {})
        if "in_channels" not in vision and "in_chans" in vision:  # released checkpoints' name
            vision["in_channels"] = vision["in_chans"]
        vrope = vision.get("rope_parameters") or {}
        if "rope_theta" in vrope:
            vision["rope_theta"] = vrope["rope_theta"]
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = tuple(vision["fullatt_block_indexes"])
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        text_cfg = TextConfig(**_pick(TextConfig, text))
        vision_cfg = VisionConfig(**_pick(VisionConfig, vision))
        if sum(text_cfg.mrope_section) * 2 != text_cfg.head_dim:
            raise ValueError(f"{source}: mrope_section {text_cfg.mrope_section} does not cover head_dim "
                             f"{text_cfg.head_dim}")
        top = {k: src[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id", "bos_token_id", "eos_token_id")
               for src in (text, d) if isinstance(src.get(k), int)}
        return cls(vision=vision_cfg, text=text_cfg, tie_word_embeddings=bool(tie), extra=dict(d), **top)

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen25VLConfig":
        path = Path(path)
        if not path.is_file():
            if path.name == "config.json":
                check_model_dir(path.parent)  # names the missing folder when that is what is missing
            raise FileNotFoundError(f"{path}: not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a model config (a JSON object expected)")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json content (transformers 5 nested layout, decoder fields mirrored at top level)."""
        d = {k: v for k, v in self.extra.items() if k not in ("text_config", "vision_config")}
        text = dict(self.extra.get("text_config") or {})
        vision = dict(self.extra.get("vision_config") or {})
        t, v = dataclasses.asdict(self.text), dataclasses.asdict(self.vision)
        rope = dict(text.get("rope_parameters") or d.get("rope_scaling") or {})
        rope.update(rope_type=rope.get("rope_type", "default"), rope_theta=t.pop("rope_theta"),
                    mrope_section=list(t.pop("mrope_section")))
        text.update(t, rope_parameters=rope, model_type="qwen2_5_vl_text",
                    tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                    eos_token_id=self.eos_token_id)
        if isinstance(self.extra.get("pad_token_id"), int):
            text["pad_token_id"] = self.extra["pad_token_id"]
        vrope = dict(vision.get("rope_parameters") or {"rope_type": "axial"})
        vrope["rope_theta"] = v.pop("rope_theta")
        v["fullatt_block_indexes"] = list(v["fullatt_block_indexes"])
        vision.update(v, rope_parameters=vrope)
        vision.setdefault("model_type", "qwen2_5_vl")
        d.update({k: text[k] for k in t})
        for k in ("rope_scaling", "rope_parameters", "rope_theta"):  # live in text_config only
            d.pop(k, None)
        d.update(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
                 text_config=text, vision_config=vision, tie_word_embeddings=self.tie_word_embeddings,
                 image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                 vision_start_token_id=self.vision_start_token_id,
                 vision_end_token_id=self.vision_end_token_id,
                 bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)
        return d


def check_model_dir(model_dir: str | Path, *, tokenizer: bool = False) -> Path:
    """``model_dir`` as a Path when it is a local HF Qwen2.5-VL folder, else one line naming what is
    missing. A path is never taken for a hub id: nothing is downloaded, so a mistyped folder fails
    here at once instead of in transformers' hub lookup (or its unrelated "install sentencepiece"
    when the folder is empty)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such folder (expected a local Hugging Face Qwen2.5-VL folder; "
                                f"nothing is downloaded)")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: config.json not found (not a Hugging Face model folder)")
    if tokenizer and not ((d / "tokenizer.json").is_file()
                          or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())):
        raise FileNotFoundError(f"{d}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    return d


def _pick(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}
