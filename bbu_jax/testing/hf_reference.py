"""transformers-side inputs for parity tests (and benchmarks/generate.py), built the way
Qwen2_5_VLProcessor builds them. Lives under tests/: it imports torch, which the product never does.

Qwen2_5_VLProcessor itself cannot be constructed without torchvision (its video processor needs
it), which has no CPU build next to torch 2.13 here. Its image path is only: the image processor
(the PIL one when torchvision is absent) plus each `<|image_pad|>` expanded to t*h*w/4 copies,
then the tokenizer. This module does exactly that, so tests compare against transformers' own
image processor and tokenizer.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

IMAGE_PAD = "<|image_pad|>"


def processor_inputs(hf_dir: str | os.PathLike, texts: Sequence[str],
                     images: Sequence[Sequence["object"]] | None = None, *,
                     padding_side: str = "right", **image_kwargs: object) -> dict[str, np.ndarray]:
    """Tokenize chat-template strings (one `<|image_pad|>` per image) with their images.

    Returns numpy input_ids, attention_mask, mm_token_type_ids (1 on image tokens) and, when
    images are given, pixel_values
    (num_patches, 1176) and image_grid_thw (num_images, 3), as the HF processor does.
    ``image_kwargs`` (e.g. min_pixels, max_pixels) go to the image processor.
    """
    from transformers import AutoTokenizer
    # The PIL processor, named: the one bbu_jax matches; AutoImageProcessor picks it only in some
    # transformers 5.x (others pick, or require, the torchvision one).
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    tokenizer.padding_side = padding_side
    out: dict[str, np.ndarray] = {}
    texts = list(texts)
    flat_images = [im for per_text in (images or []) for im in per_text]
    if flat_images:
        processor = Qwen2VLImageProcessorPil.from_pretrained(hf_dir, local_files_only=True)
        feats = processor(images=flat_images, return_tensors="np", **image_kwargs)
        grids = np.asarray(feats["image_grid_thw"])
        out["pixel_values"] = np.asarray(feats["pixel_values"], np.float32)
        out["image_grid_thw"] = grids
        merge = processor.merge_size ** 2
        k = 0
        for i, text in enumerate(texts):
            pieces = text.split(IMAGE_PAD)
            expanded = pieces[0]
            for piece in pieces[1:]:
                expanded += "<|placeholder|>" * int(np.prod(grids[k]) // merge) + piece
                k += 1
            texts[i] = expanded.replace("<|placeholder|>", IMAGE_PAD)
        if k != len(flat_images):
            raise ValueError(f"{k} image placeholders in the texts but {len(flat_images)} images")
    enc = tokenizer(texts, padding=True, return_tensors="np")
    out["input_ids"] = np.asarray(enc["input_ids"], np.int64)
    out["attention_mask"] = np.asarray(enc["attention_mask"], np.int64)
    # The processor marks image tokens; without this field transformers silently falls back to
    # 1D positions for them instead of M-RoPE.
    out["mm_token_type_ids"] = (out["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).astype(np.int64)
    return out


def torch_reference_model(hf_dir: str | os.PathLike, attn_implementation: str = "eager"):
    """transformers' PyTorch Qwen2.5-VL in float32, eval mode (tests only)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True)
    return model.eval()


def torch_logits(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of the reference model for processor_inputs() output."""
    import torch

    with torch.no_grad():
        kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        return model(**kwargs).logits.float().numpy()
