"""Qwen2.5-VL in Flax NNX: HF weights in and out, logits equal to transformers."""
from bbu_jax.models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig
from bbu_jax.models.qwen2_5_vl.model import Qwen25VL, hf_forward, scatter_vision_tokens
from bbu_jax.models.qwen2_5_vl.params import from_hf, hf_tensors, to_hf_state_dict

__all__ = ["Qwen25VL", "Qwen25VLConfig", "TextConfig", "VisionConfig", "from_hf", "hf_forward", "hf_tensors",
           "scatter_vision_tokens", "to_hf_state_dict"]
