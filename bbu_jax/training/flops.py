"""Model FLOPs of a training step: the one count behind the training log's MFU and every benchmark.

Useful work only: 2 FLOPs per multiply-add of each weight matrix with each item it transforms
(decoder per token, LM head per supervised token -- the step's fused LM loss
(``losses.lm_loss``) builds logits only where a target is supervised, so logits of prompt tokens
are no work the model needs --, vision tower per patch, merger per merged token), plus attention
(QK^T and PV: 4 x head_dim x heads per visible (query, key) pair: causal within each packed
sample for the text, within each window or image for the vision tower). A training step is
3 x forward (the backward costs two forwards). Recomputation (remat), padding and pairs a kernel
multiplies but masks are not work the model needs, so they lower the MFU rather than raise it;
``attention_pairs`` shows how far each attention kernel's work exceeds the visible pairs.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig, processing

Grid = tuple[int, int, int]  # (t, h, w) in patches


@functools.lru_cache(maxsize=4096)
def _vision_pairs(grid: Grid, window_size: int, patch_size: int, spatial_merge_size: int) -> tuple[int, int]:
    """(window-layer pairs, full-layer pairs) of one image: sums of squared window / image sizes.
    Cached: a training run meets the same few grids every step."""
    lay = processing.vision_layout([grid], window_size=window_size, patch_size=patch_size,
                                   spatial_merge_size=spatial_merge_size)
    windows = np.bincount(lay.window_ids)[1:].astype(np.int64)
    frames = np.bincount(lay.image_ids)[1:].astype(np.int64)
    return int((windows**2).sum()), int((frames**2).sum())


def step_flops(cfg: Qwen25VLConfig, *, segments: Sequence[Sequence[int]], images: Sequence[Sequence[Grid]],
               supervised: Sequence[int], head_params: int = 0) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward).

    segments[row]: token lengths of the row's samples; images[row]: each image's grid (t, h, w) in
    patches; supervised[row]: the row's tokens with a supervised target (``target_kind > 0``), the
    ones the LM head is needed for. head_params: the detection head's parameter count, charged once per token like the
    decoder's (its adapters read a share of the tokens, its decoder a few queries per sample: an
    estimate, and a small term beside the decoder's)."""
    t, v = cfg.text, cfg.vision
    hd = t.head_dim
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    text_params = t.num_hidden_layers * (t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size)
    lm_head_params = t.vocab_size * t.hidden_size  # the input embedding is a lookup, not a product
    vis_block = 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size  # qkv + proj; gated MLP
    vis_params = v.patch_dim * v.hidden_size + v.depth * vis_block
    merged = v.hidden_size * v.spatial_merge_size**2
    merger_params = merged * merged + merged * v.out_hidden_size
    n_full = len(v.fullatt_block_indexes)

    fwd = 0.0
    for row_segments, row_images, row_supervised in zip(segments, images, supervised, strict=True):
        tokens = sum(row_segments)
        fwd += 2 * tokens * (text_params + head_params) + 2 * row_supervised * lm_head_params
        pairs = sum(s * (s + 1) // 2 for s in row_segments)  # causal, within each segment
        fwd += 4 * t.num_hidden_layers * t.num_attention_heads * hd * pairs
        for grid in row_images:
            n = int(np.prod(grid))
            fwd += 2 * n * vis_params + 2 * (n // v.spatial_merge_size**2) * merger_params
            win, full = _vision_pairs(tuple(int(x) for x in grid), v.window_size, v.patch_size,
                                      v.spatial_merge_size)
            fwd += 4 * v.hidden_size * ((v.depth - n_full) * win + n_full * full)
    return 3 * fwd


def batch_layout(batch: Mapping[str, np.ndarray]) -> tuple[list[list[int]], list[list[Grid]]]:
    """(segment lengths, image grids (1, h, w) in patches) of each row of a bbu_jax batch, read from
    its segment_ids, patch_image_ids and patch_pos: what ``step_flops`` takes. Leading axes before
    the row axis (a step's stacked micro-batches) are rows too."""
    seg_ids = np.asarray(batch["segment_ids"])
    image_ids = np.asarray(batch["patch_image_ids"])
    patch_pos = np.asarray(batch["patch_pos"])
    seg_ids = seg_ids.reshape(-1, seg_ids.shape[-1])
    image_ids = image_ids.reshape(-1, image_ids.shape[-1])
    patch_pos = patch_pos.reshape(-1, *patch_pos.shape[-2:])
    segments, grids = [], []
    for seg, img, pos in zip(seg_ids, image_ids, patch_pos):
        segments.append([int(n) for n in np.bincount(seg[seg > 0]) if n])
        row = []
        for i in np.unique(img[img > 0]):
            p = pos[img == i]
            h, w = int(p[:, 0].max()) + 1, int(p[:, 1].max()) + 1
            if h * w != len(p):
                raise ValueError(f"image {i}: {len(p)} patches do not fill its {h} x {w} grid")
            row.append((1, h, w))
        grids.append(row)
    return segments, grids


def supervised_tokens(batch: Mapping[str, np.ndarray]) -> list[int]:
    """Tokens with a supervised target in each row of a batch (leading axes are rows too)."""
    kind = np.asarray(batch["target_kind"])
    return [int(n) for n in (kind.reshape(-1, kind.shape[-1]) > 0).sum(-1)]


def batch_flops(cfg: Qwen25VLConfig, batch: Mapping[str, np.ndarray], head_params: int = 0) -> float:
    """``step_flops`` of the rows of a host batch (any leading axes): a training step's model
    FLOPs for the rows this process holds."""
    segments, images = batch_layout(batch)
    return step_flops(cfg, segments=segments, images=images, supervised=supervised_tokens(batch),
                      head_params=head_params)


def head_param_count(params: Mapping) -> int:
    """The detection head's parameter count in a train state's params (0 without a head): what
    ``batch_flops`` charges per token for it, in the training log and the MFU benchmark alike."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params.get("head", {}))))


def attention_pairs(batch: Mapping[str, np.ndarray], implementation: str) -> dict[str, tuple[int, int]]:
    """(computed, needed) (query, key) pairs of one forward layer, summed over rows, for the text
    ("causal within each segment"), the vision windows and the vision tower's full layers. Needed:
    the visible pairs. Computed: what the kernel multiplies -- every pair of the row for "jax" /
    "cudnn" (the mask is applied to the scores), the visited blocks for "pallas"; "xla" is left
    out (its query-block skipping is a CPU measure)."""
    import jax.numpy as jnp

    from bbu_jax.models.flash_attention import FORWARD_BLOCKS, padded_length, visible_block_ranges

    out = {}
    for name, key, causal in (("text", "segment_ids", True), ("vision windows", "patch_window_ids", False),
                              ("vision full", "patch_image_ids", False)):
        seg = np.asarray(batch[key])
        needed = 0
        for row in seg:
            n = np.bincount(row[row > 0])[1:].astype(np.int64)
            needed += int((n * (n + 1) // 2).sum() if causal else (n * n).sum())
        if implementation in ("jax", "cudnn"):
            computed = seg.shape[0] * seg.shape[1] ** 2
        elif implementation == "pallas":
            bq, bk = FORWARD_BLOCKS[causal]
            padded = np.pad(seg, ((0, 0), (0, padded_length(seg.shape[1]) - seg.shape[1])))
            lo, hi = visible_block_ranges(jnp.asarray(padded), bq, bk, causal=causal, of_queries=True)
            computed = int(np.asarray(hi - lo).sum()) * bq * bk
        else:
            continue
        out[name] = (computed, needed)
    return out
