"""Write a tiny Hugging Face-format Qwen2.5-VL folder with no torch and no network.

Tests and the demo need a real HF checkpoint folder (config.json, safetensors in the original
key layout, tokenizer with Qwen's special tokens and chat template, processor config) but can
neither download one nor afford the 3B weights. transformers loads what this writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bbu_jax.data.chat import INSTRUCTIONS, SYSTEM_PROMPT, format_answer
from bbu_jax.data.synthetic import DESC_TYPES
from bbu_jax.foundation.files import atomic_dir, save_safetensors_shards

# Qwen2's special tokens in their original order (ids follow the regular vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2.5-VL's chat template (chat_template.json of the released checkpoints).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenization regex.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Text the BPE merges are learned from: the prompts, JSON answers and BBU vocabulary the model
# will see, so tiny-model sequences stay short. Qwen's own 151k-token vocabulary holds these words
# whole; a tiny vocabulary that spelled "empty" or "visible" letter by letter would make the tiny
# model's answers a spelling task the real model never has.
_CORPUS = [
    SYSTEM_PROMPT, *INSTRUCTIONS.values(),
    "螺丝连接点 BBU安装螺丝 连接正确 连接错误 松动 线缆 光纤 标签 端口 电源 接地 指示灯 正常 异常 缺失",
    "screw cable fiber label port power ground indicator led normal abnormal missing loose tight "
    "connected disconnected present absent bbu unit rack slot module fan panel",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 100 128 200 224 256 300 448 512",
    *(format_answer([((12, 34, 156, 178), zh), ((0, 9, 80, 91), en)]) for zh, en in DESC_TYPES.items()),
]


def _train_tokenizer(vocab_size: int) -> "Any":
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def tiny_config(vocab_size: int, special_ids: dict[str, int], **overrides: Any) -> dict[str, Any]:
    """config.json in the released checkpoints' flat layout, scaled down.

    Overrides apply to top-level (text) keys, or to the vision tower with a ``vision_`` prefix
    (e.g. ``vision_depth=4``).
    """
    vision = {
        "depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64,
        "num_heads": 2, "in_chans": 3, "out_hidden_size": 64, "patch_size": 14,
        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
        "fullatt_block_indexes": [1], "tokens_per_second": 2, "temporal_patch_size": 2,
    }
    # rope_theta: the 3B's 1e6 turns M-RoPE's width section (its lowest frequencies) by at most 1.8e-4
    # rad per image column; the 3B finds positions anyway through its 36 layers, a 2-layer model
    # cannot tell the columns apart. 100: 0.056-0.018 rad per column.
    text = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 64,
        "intermediate_size": 128, "initializer_range": 0.02, "max_position_embeddings": 4096,
        "max_window_layers": 2, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 100.0,
        "sliding_window": 4096, "use_sliding_window": False, "tie_word_embeddings": True,
        "torch_dtype": "float32", "use_cache": True, "vocab_size": vocab_size,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "bos_token_id": special_ids["<|endoftext|>"], "eos_token_id": special_ids["<|im_end|>"],
        "pad_token_id": special_ids["<|endoftext|>"],
        "vision_start_token_id": special_ids["<|vision_start|>"],
        "vision_end_token_id": special_ids["<|vision_end|>"],
        "vision_token_id": special_ids["<|vision_pad|>"],
        "image_token_id": special_ids["<|image_pad|>"],
        "video_token_id": special_ids["<|video_pad|>"],
    }
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        else:
            text[key] = value
    if "hidden_size" in overrides and "vision_out_hidden_size" not in overrides:
        vision["out_hidden_size"] = text["hidden_size"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if sum(text["rope_scaling"]["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"mrope_section {text['rope_scaling']['mrope_section']} must sum to "
                         f"head_dim/2 = {head_dim // 2}")
    text["vision_config"] = vision
    return text


def random_weights(config: dict[str, Any], seed: int = 0, std: float = 0.05,
                   dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Random tensors under the released checkpoints' keys (model.layers.*, visual.*)."""
    rng = np.random.default_rng(seed)
    v, t = config["vision_config"], config

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    def norm(n: int) -> np.ndarray:  # around 1, not exactly, so a wrong norm shows in parity
        return (1.0 + rng.standard_normal(n, dtype=np.float32) * 0.1).astype(dtype)

    w: dict[str, np.ndarray] = {}
    dv, iv, p, tp = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["temporal_patch_size"]
    w["visual.patch_embed.proj.weight"] = normal(dv, 3, tp, p, p)
    for i in range(v["depth"]):
        b = f"visual.blocks.{i}."
        w[b + "norm1.weight"], w[b + "norm2.weight"] = norm(dv), norm(dv)
        w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"] = normal(3 * dv, dv), normal(3 * dv)
        w[b + "attn.proj.weight"], w[b + "attn.proj.bias"] = normal(dv, dv), normal(dv)
        for name, (o, i_) in {"gate_proj": (iv, dv), "up_proj": (iv, dv), "down_proj": (dv, iv)}.items():
            w[b + f"mlp.{name}.weight"], w[b + f"mlp.{name}.bias"] = normal(o, i_), normal(o)
    merged = dv * v["spatial_merge_size"] ** 2
    w["visual.merger.ln_q.weight"] = norm(dv)
    w["visual.merger.mlp.0.weight"], w["visual.merger.mlp.0.bias"] = normal(merged, merged), normal(merged)
    w["visual.merger.mlp.2.weight"] = normal(v["out_hidden_size"], merged)
    w["visual.merger.mlp.2.bias"] = normal(v["out_hidden_size"])

    d, it, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    hd = d // t["num_attention_heads"]
    nq, nkv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    w["model.embed_tokens.weight"] = normal(vocab, d)
    for i in range(t["num_hidden_layers"]):
        b = f"model.layers.{i}."
        w[b + "input_layernorm.weight"], w[b + "post_attention_layernorm.weight"] = norm(d), norm(d)
        w[b + "self_attn.q_proj.weight"], w[b + "self_attn.q_proj.bias"] = normal(nq, d), normal(nq)
        w[b + "self_attn.k_proj.weight"], w[b + "self_attn.k_proj.bias"] = normal(nkv, d), normal(nkv)
        w[b + "self_attn.v_proj.weight"], w[b + "self_attn.v_proj.bias"] = normal(nkv, d), normal(nkv)
        w[b + "self_attn.o_proj.weight"] = normal(d, nq)
        w[b + "mlp.gate_proj.weight"], w[b + "mlp.up_proj.weight"] = normal(it, d), normal(it, d)
        w[b + "mlp.down_proj.weight"] = normal(d, it)
    w["model.norm.weight"] = norm(d)
    if not t["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(vocab, d)
    return w


def write_tiny_qwen2_5_vl(out_dir: str | os.PathLike, seed: int = 0, *, bpe_vocab: int = 1000,
                          min_pixels: int = 3136, max_pixels: int = 12845056,
                          weights_dtype: Any = np.float32, max_shard_bytes: int | None = None,
                          **overrides: Any) -> Path:
    """Write the folder atomically and return its path. ``overrides`` go to tiny_config().

    ``weights_dtype`` may be ``ml_dtypes.bfloat16`` (as released checkpoints are);
    ``max_shard_bytes`` splits the weights into shards with an index file.
    """
    out = Path(out_dir)
    tok = _train_tokenizer(bpe_vocab)
    special_ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    padded = -(-tok.get_vocab_size() // 64) * 64  # pad like Qwen does (151936 > 151665)
    vocab_size = overrides.pop("vocab_size", padded)
    if vocab_size < tok.get_vocab_size():
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {tok.get_vocab_size()}")
    config = tiny_config(vocab_size, special_ids, **overrides)
    config["torch_dtype"] = np.dtype(weights_dtype).name

    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_safetensors_shards(random_weights(config, seed, dtype=weights_dtype), tmp,
                                max_shard_bytes)
        tok.save(str(tmp / "tokenizer.json"))
        added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
                 for s, i in special_ids.items()}
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added,
            "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "clean_up_tokenization_spaces": False, "errors": "replace",
            "model_max_length": 32768, "split_special_tokens": False,
            "chat_template": CHAT_TEMPLATE,
        }, indent=2, ensure_ascii=False))
        (tmp / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "min_pixels": min_pixels, "max_pixels": max_pixels,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        }, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": special_ids["<|endoftext|>"], "pad_token_id": special_ids["<|endoftext|>"],
            "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
            "do_sample": False,
        }, indent=2))
    return out
