"""The batch contract: the one layout the loader produces and the jitted step consumes.

Every array is numpy with a shape fixed by the config's budgets, so the step compiles once:

  B  rows per batch            L  token budget per row        P  patch budget per row (multiple of 4)
  S  segments (samples) per row M  objects per segment        C  caption tokens per object
  NV vision-memory tokens per segment (student image tokens)  NT text-memory tokens per segment

A row holds S whole samples ("segments", ids 1..S; 0 marks padding). Tokens, patches and merged
vision tokens of a row only attend within their own segment / window / image.

Patches are stored already permuted into the vision tower's window order (the host applies
Qwen2.5-VL's window_index), so the tower needs no gather; ``vision_token_index`` then places each
merged vision token (index into the row's P/4 merged tokens, in that window order) at its
`<|image_pad|>` position in the text.

Patches travel as uint8 pixels, one byte per value: the vision tower maps them through the HF
processor's normalization table and repeats the frame over the temporal axis on the device, which
gives the processor's float rows exactly. Float rows (B, P, 1176), as ``processing.prepare_hf_batch``
takes them from the HF processor, are accepted by the model too; the loader never makes them (8x
the bytes to fill, copy between processes and send to the devices).
"""
from __future__ import annotations

import numpy as np

PATCH_PIXELS = 588  # 3 channels * 14 * 14 uint8 pixels of one frame (models.qwen2_5_vl.processing.image_pixels)

# name -> (dims, dtype). Dims name the budgets above; literals are fixed sizes.
FIELDS: dict[str, tuple[tuple[str | int, ...], type]] = {
    # --- language model ---
    "input_ids": (("B", "L"), np.int32),
    "positions": (("B", 3, "L"), np.int32),  # M-RoPE (t, h, w), restarting at 0 per segment
    "segment_ids": (("B", "L"), np.int32),  # 1..S, 0 = padding
    # Shifted targets: logits at position t are scored against targets[t] (the next token of
    # the same segment). target_kind: 0 = not supervised, 1 = teacher answer, 2 = student answer.
    "targets": (("B", "L"), np.int32),
    "target_kind": (("B", "L"), np.int8),
    # --- vision tower (patches in window order) ---
    "patches": (("B", "P", PATCH_PIXELS), np.uint8),  # the tower normalizes them (see module doc)
    "patch_pos": (("B", "P", 2), np.int32),  # (row, col) of each patch in its image's patch grid
    "patch_window_ids": (("B", "P"), np.int32),  # window-attention blocks; 0 = padding
    "patch_image_ids": (("B", "P"), np.int32),  # full-attention blocks (one image); 0 = padding
    "vision_token_index": (("B", "L"), np.int32),  # merged-token index for image pads, -1 otherwise
    # --- detection head: per segment memory indices into the row's tokens ---
    "det_vision_index": (("B", "S", "NV"), np.int32),  # student image-token positions
    "det_vision_mask": (("B", "S", "NV"), np.bool_),
    "det_vision_pos": (("B", "S", "NV", 2), np.float32),  # normalized (y, x) centre in its image
    "det_text_index": (("B", "S", "NT"), np.int32),  # student prompt-token positions (no answer)
    "det_text_mask": (("B", "S", "NT"), np.bool_),
    # --- detection targets (student only) ---
    "gt_boxes": (("B", "S", "M", 4), np.float32),  # normalized cxcywh
    "gt_valid": (("B", "S", "M"), np.bool_),
    "gt_caption_ids": (("B", "S", "M", "C"), np.int32),  # LLM token ids of the desc + end token
    "gt_caption_mask": (("B", "S", "M", "C"), np.bool_),
    "segment_valid": (("B", "S"), np.bool_),  # segment holds a real sample
}

# Which fields each module reads (the rest are loss targets).
MODEL_INPUTS = ("input_ids", "positions", "segment_ids", "patches", "patch_pos", "patch_window_ids",
                "patch_image_ids", "vision_token_index")
HEAD_INPUTS = ("det_vision_index", "det_vision_mask", "det_vision_pos", "det_text_index", "det_text_mask")


def expected_shapes(dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every field for the given budgets (keys B, L, P, S, M, C, NV, NT)."""
    return {name: tuple(dims[d] if isinstance(d, str) else d for d in spec)
            for name, (spec, _) in FIELDS.items()}


def check_batch(batch: dict[str, np.ndarray], dims: dict[str, int]) -> None:
    """Raise ValueError naming every field whose presence, shape or dtype breaks the contract."""
    problems = []
    shapes = expected_shapes(dims)
    for name, (_, dtype) in FIELDS.items():
        if name not in batch:
            problems.append(f"{name}: missing")
            continue
        arr = np.asarray(batch[name])
        if arr.shape != shapes[name]:
            problems.append(f"{name}: shape {arr.shape}, expected {shapes[name]}")
        if arr.dtype != np.dtype(dtype):
            problems.append(f"{name}: dtype {arr.dtype}, expected {np.dtype(dtype)}")
    extra = sorted(set(batch) - set(FIELDS))
    if extra:
        problems.append(f"unknown fields {extra}")
    if problems:
        raise ValueError("batch does not follow bbu_jax.data.batch.FIELDS:\n  " + "\n  ".join(problems))
