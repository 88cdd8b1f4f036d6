"""The offline checkpoint factory writes a folder transformers accepts as Qwen2.5-VL."""
import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from bbu_jax.data.synthetic import DESC_TYPES
from bbu_jax.workflows.tiny_model import SPECIAL_TOKENS, write_tiny_qwen2_5_vl


def test_transformers_loads_without_missing_keys(tiny_hf_dir, tiny_hf_dir_untied):
    from transformers import Qwen2_5_VLForConditionalGeneration

    for d, tied in [(tiny_hf_dir, True), (tiny_hf_dir_untied, False)]:
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        keys = load_file(str(d / "model.safetensors")).keys()
        assert ("lm_head.weight" in keys) is (not tied)
        assert any(k.startswith("model.layers.") for k in keys) and any(k.startswith("visual.") for k in keys)


def test_tokenizer_special_tokens_and_chat_template(tiny_hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))  # Qwen's order, contiguous
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config["vocab_size"] >= len(tok)
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "找螺丝"}]}],
        add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>找螺丝<|im_end|>\n<|im_start|>assistant\n")
    # Byte-level BPE round-trips any text, Chinese included.
    sample = '```json\n[{"bbox_2d": [1, 2, 30, 40], "desc": "螺丝连接点/BBU安装螺丝/连接正确"}]\n```'
    assert tok.decode(tok(sample)["input_ids"]) == sample


def test_tokenizer_holds_the_synthetic_descs_words_whole(tiny_hf_dir):
    """As Qwen's vocabulary does: one token per word of every desc, en and zh (not spelled out)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    for desc in [d for pair in DESC_TYPES.items() for d in pair]:
        words = re.split(r"[/ ]", desc)
        assert len(tok.tokenize(desc)) <= len(words), (desc, tok.tokenize(desc))


def test_seeded_and_overridable(tmp_path):
    a = load_file(str(write_tiny_qwen2_5_vl(tmp_path / "a", seed=3) / "model.safetensors"))
    b = load_file(str(write_tiny_qwen2_5_vl(tmp_path / "b", seed=3) / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = write_tiny_qwen2_5_vl(tmp_path / "c", num_hidden_layers=3, vision_depth=4)
    cfg = json.loads((c / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["vision_config"]["depth"] == 4
    with pytest.raises(ValueError, match="mrope_section"):
        write_tiny_qwen2_5_vl(tmp_path / "d", hidden_size=96)


def test_sharded_bf16_checkpoint_loads(tmp_path):
    import ml_dtypes
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = write_tiny_qwen2_5_vl(tmp_path / "s", weights_dtype=ml_dtypes.bfloat16, max_shard_bytes=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
