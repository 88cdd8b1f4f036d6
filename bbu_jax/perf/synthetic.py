"""Synthetic stand-ins with the product's shapes, for measuring without data or weights: a tiny
Qwen2.5-VL config, packed rows whose model inputs come from the model's own host functions, and a
run's specs pointed at synthetic photos for its own train iterator."""
from __future__ import annotations

import numpy as np

from bbu_jax.data.batch import MODEL_INPUTS
from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig, processing
from bbu_jax.training.flops import Grid


def tiny_config() -> Qwen25VLConfig:
    """A Qwen2.5-VL small enough for CPU runs of the 3B code paths: GQA, M-RoPE sections, vision
    windows and one full-attention block."""
    return Qwen25VLConfig(
        text=TextConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            fullatt_block_indexes=(1,)),
        image_token_id=630, video_token_id=631, vision_start_token_id=632, vision_end_token_id=633,
        bos_token_id=634, eos_token_id=635)


def packed_batch(cfg: Qwen25VLConfig, *, rows: int, tokens: int, segments: int, image_side: int, seed: int = 0
                 ) -> tuple[dict[str, np.ndarray], list[list[int]], list[list[Grid]]]:
    """Rows of ``segments`` samples, each [text, vision_start, image pads, vision_end, text...] with one
    ``image_side``^2 image, filling ``tokens``; targets = next token of the same segment, supervised
    on each sample's second half. Returns the batch (model inputs, ``targets``, ``target_kind``),
    the segment lengths and the image grids of each row (what ``flops.step_flops`` takes)."""
    v = cfg.vision
    rng = np.random.default_rng(seed)
    side = image_side // v.patch_size
    grid = (1, side, side)
    n_img = processing.num_image_tokens(grid, v.spatial_merge_size)
    seg_len = tokens // segments
    if seg_len < n_img + 4:
        raise ValueError(f"{segments} segments of {seg_len} tokens cannot hold a {n_img}-token image")
    patches_per_row = segments * side * side
    special = {cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    keep = np.array([i for i in range(min(cfg.text.vocab_size, 4096)) if i not in special])
    out = {k: [] for k in (*MODEL_INPUTS, "targets", "target_kind")}
    for _ in range(rows):
        ids = np.zeros(tokens, np.int64)
        pos = np.zeros((3, tokens), np.int64)
        seg = np.zeros(tokens, np.int64)
        kind = np.zeros(tokens, np.int64)
        targets = np.zeros(tokens, np.int64)
        vti = np.full(tokens, -1, np.int64)
        lay = processing.vision_layout([grid] * segments, window_size=v.window_size, patch_size=v.patch_size,
                                       spatial_merge_size=v.spatial_merge_size)
        for s in range(segments):
            a = s * seg_len
            sample = rng.choice(keep, seg_len)
            sample[1] = cfg.vision_start_token_id
            sample[2:2 + n_img] = cfg.image_token_id
            sample[2 + n_img] = cfg.vision_end_token_id
            ids[a:a + seg_len] = sample
            pos[:, a:a + seg_len], _ = processing.rope_index(sample, [grid], image_token_id=cfg.image_token_id,
                                                             vision_start_token_id=cfg.vision_start_token_id,
                                                             spatial_merge_size=v.spatial_merge_size)
            seg[a:a + seg_len] = s + 1
            targets[a:a + seg_len - 1] = sample[1:]
            kind[a + seg_len // 2:a + seg_len - 1] = 2
            vti[a + 2:a + 2 + n_img] = lay.merged_index[s * n_img:(s + 1) * n_img]
        out["input_ids"].append(ids)
        out["positions"].append(pos)
        out["segment_ids"].append(seg)
        out["targets"].append(targets)
        out["target_kind"].append(kind)
        out["vision_token_index"].append(vti)
        out["patches"].append(rng.integers(0, 256, (patches_per_row, v.in_channels * v.patch_size**2)))  # uint8 pixels
        out["patch_pos"].append(lay.pos)
        out["patch_window_ids"].append(lay.window_ids)
        out["patch_image_ids"].append(lay.image_ids)
    dtypes = {"patches": np.uint8, "target_kind": np.int8}
    batch = {k: np.stack(x).astype(dtypes.get(k, np.int32)) for k, x in out.items()}
    return batch, [[seg_len] * segments] * rows, [[grid] * segments] * rows



def with_synthetic_data(specs, folder: str, num_images: int, *, scenes=None, hf_dir: str | None = None):
    """``specs`` with its data and tokenizer pointing at ``num_images`` synthetic photos converted
    under ``folder`` at the specs' pixel limits with a teacher pool: what the run's train iterator
    would read, without a dataset. ``scenes(folder, n, seed=)`` writes them (default
    ``data.synthetic.write_field_dataset``: phone aspects, 2..45 objects, zh descs; the demo's
    small rack scenes are ``write_labelme_dataset``). ``hf_dir``: the model folder whose tokenizer
    encodes them (default: the tiny test model written there, whose zh text runs longer than Qwen's)."""
    import dataclasses
    import os

    from bbu_jax.data.convert import convert_dataset
    from bbu_jax.data.synthetic import write_field_dataset
    from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl

    d = specs.data
    raw, data = os.path.join(folder, "raw"), os.path.join(folder, "data")
    (scenes or write_field_dataset)(raw, num_images, seed=specs.run.seed)
    convert_dataset(raw, "labelme", data, min_pixels=d.min_pixels, max_pixels=d.max_pixels, val_ratio=0.05,
                    teacher_pool_size=max(1, num_images // 10), seed=specs.run.seed, language=d.language,
                    progress=False)
    hf_dir = hf_dir or str(write_tiny_qwen2_5_vl(os.path.join(folder, "tiny")))
    return dataclasses.replace(
        specs, model=dataclasses.replace(specs.model, hf_dir=hf_dir),
        data=dataclasses.replace(d, train_jsonl=os.path.join(data, "train.jsonl"), val_jsonl="",
                                 teacher_pool_jsonl=os.path.join(data, "teacher_pool.jsonl")))
