"""Training throughput and MFU of the bbu_jax Qwen2.5-VL step (vision tower counted).

The real model (``Qwen25VL``, random weights, params float32, compute in ``--dtype``), the real
fused chunked LM loss (``lm_loss``) and optax AdamW, in one jitted step with the state donated, on
packed rows: each row holds ``--segments`` samples, each one ``--image_side``^2 image followed by
text, filling ``--tokens`` tokens (segment ids keep samples apart in both the decoder and the
vision tower). One device (``jax.devices()[0]``); multi-device sharding is the training loop's job.

MFU = model FLOPs / step time / peak. Model FLOPs (``step_flops``) = 3 x forward, forward = 2 x
(matmul params x tokens) for the decoder + LM head, the vision tower per patch and the merger per
merged token, plus attention (4 x head_dim x heads per attended (query, key) pair: causal within
each segment for text, within each window / image for the vision tower). Peak: the datasheet
dense rate of the device in ``--dtype`` (H100/H200 bf16: 989 TFLOP/s) and, alongside, a plain
matmul measured in the same run.

Attention (``--attention``): "xla" builds masked (B, H, L, L) scores (CPU reference); "cudnn"
(jax.nn.dot_product_attention, implementation="cudnn") is fused on GPU: scores are never
materialized, but it multiplies every (query, key) pair of the row (the segment mask travels as a
(B, 1, L, L) boolean -> bias operand); "pallas" (``flash_attention.segment_flash_attention``,
Triton) is fused and visits only the key blocks each query block can see. Default: cudnn on GPU,
xla elsewhere. ``--pairs_only`` prints, without a model or device, the pairs each GPU kernel
computes for the batch against the pairs needed. Remat (``--remat``): "full" recomputes each layer
in the backward pass (needed for 8192-token rows at 3B), or a jax.checkpoint_policies name.

  python benchmarks/mfu.py                 # 3B shape, bf16, 1 row of 8192 tokens (GPU)
  python benchmarks/mfu.py --attention pallas
  python benchmarks/mfu.py --pairs_only    # attention work per kernel (any machine)
  python benchmarks/mfu.py --tiny          # same code, tiny size, CPU (CI; not for timing)

Last line: `mfu: X% of PEAK TFLOP/s (...), N tokens/s/device`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import numpy as np  # noqa: E402

# Datasheet dense peak FLOP/s by device kind substring and compute dtype.
PEAKS = {("H100", "bfloat16"): 989e12, ("H200", "bfloat16"): 989e12, ("H100", "float32"): 67e12,
         ("H200", "float32"): 67e12}
MODEL_INPUTS = ("input_ids", "positions", "segment_ids", "patches", "patch_pos", "patch_window_ids",
                "patch_image_ids", "vision_token_index")


# ----------------------------------------------------------------------------- FLOPs

def _attended_pairs_vision(grid: tuple[int, int, int], vcfg) -> tuple[int, int]:
    """(window-layer pairs, full-layer pairs) of one image: sum of squared window / frame sizes."""
    from bbu_jax.models.qwen2_5_vl import processing

    lay = processing.vision_layout([grid], window_size=vcfg.window_size, patch_size=vcfg.patch_size,
                             spatial_merge_size=vcfg.spatial_merge_size)
    windows = np.bincount(lay.window_ids)[1:].astype(np.int64)
    frames = np.bincount(lay.image_ids)[1:].astype(np.int64)
    return int((windows**2).sum()), int((frames**2).sum())


def step_flops(cfg, *, segments: Sequence[Sequence[int]],
               images: Sequence[Sequence[int | tuple[int, int, int]]]) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward).

    segments[row] = token lengths of the row's samples; images[row] = each image's grid (t, h, w)
    in patches (an int n means a square (1, sqrt n, sqrt n) grid)."""
    t, v = cfg.text, cfg.vision
    hd = t.head_dim
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    text_params = t.num_hidden_layers * (t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size)
    head_params = t.vocab_size * t.hidden_size
    vis_params = v.patch_dim * v.hidden_size + v.depth * (4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size)
    merged = v.hidden_size * v.spatial_merge_size**2
    merger_params = merged * merged + merged * cfg.text.hidden_size
    n_window_layers = v.depth - len(v.fullatt_block_indexes)

    fwd = 0.0
    for row_segments, row_images in zip(segments, images):
        tokens = sum(row_segments)
        fwd += 2 * tokens * (text_params + head_params)
        pairs = sum(s * (s + 1) // 2 for s in row_segments)  # causal, within each segment
        fwd += 4 * t.num_hidden_layers * t.num_attention_heads * hd * pairs
        for g in row_images:
            grid = g if isinstance(g, tuple) else (1, int(round(g**0.5)), int(round(g**0.5)))
            n = grid[0] * grid[1] * grid[2]
            fwd += 2 * n * vis_params + 2 * (n // v.spatial_merge_size**2) * merger_params
            win, full = _attended_pairs_vision(grid, v)
            fwd += 4 * v.hidden_size * (n_window_layers * win + len(v.fullatt_block_indexes) * full)
    return 3 * fwd


def batch_layout(batch: dict[str, np.ndarray]) -> tuple[list[list[int]], list[list[tuple[int, int, int]]]]:
    """(segment lengths, image grids (1, h, w) in patches) of each row of a bbu_jax batch: what
    ``step_flops`` needs, read from segment_ids, patch_image_ids and patch_pos."""
    segments, grids = [], []
    for seg, img, pos in zip(batch["segment_ids"], batch["patch_image_ids"], batch["patch_pos"]):
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


def attention_pairs(batch: dict[str, np.ndarray], implementation: str) -> dict[str, tuple[int, int]]:
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
        seg = batch[key]
        needed = 0
        for row in seg:
            for sid in np.unique(row[row > 0]):
                n = int((row == sid).sum())
                needed += n * (n + 1) // 2 if causal else n * n
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


# ----------------------------------------------------------------------------- batch

def packed_batch(cfg, *, rows: int, tokens: int, segments: int, image_side: int, seed: int = 0
                 ) -> tuple[dict[str, np.ndarray], list[list[int]], list[list[tuple[int, int, int]]]]:
    """Rows of ``segments`` samples, each [vision_start, image pads, vision_end, text...], with the
    model inputs built by bbu_jax's host functions; targets = next token of the same segment,
    supervised on each sample's second half. Returns the batch, segment lengths and image grids."""
    from bbu_jax.models.qwen2_5_vl import processing

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


# ----------------------------------------------------------------------------- step

def lm_train_step(graphdef, rest, tx, *, lm_chunk: int):
    """(params, opt_state, batch) -> (params, opt_state, loss): forward, language loss (mean over
    supervised tokens), backward, optimizer update. jit it with the first two arguments donated."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from bbu_jax.losses.lm_loss import lm_loss

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params, rest)
        hidden = model(**{k: batch[k] for k in MODEL_INPUTS})
        count = jnp.sum(batch["target_kind"] > 0, dtype=jnp.float32)
        return lm_loss(hidden, model.lm_head_matrix(), batch["targets"], batch["target_kind"], chunk=lm_chunk,
                       scale=1.0 / jnp.maximum(count, 1.0), compute_dtype=model.compute_dtype)[0]

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def tiny_config():
    from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig, TextConfig, VisionConfig

    return Qwen25VLConfig(
        text=TextConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            fullatt_block_indexes=(1,)),
        image_token_id=630, video_token_id=631, vision_start_token_id=632, vision_end_token_id=633,
        bos_token_id=634, eos_token_id=635)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model and rows (CPU, CI); not for timing")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--tokens", type=int, default=None, help="tokens per row (default 8192; tiny 256)")
    p.add_argument("--segments", type=int, default=None, help="samples per row (default 4; tiny 2)")
    p.add_argument("--image_side", type=int, default=None, help="pixels (default 448; tiny 112)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default bf16; tiny f32")
    p.add_argument("--attention", default=None, choices=("xla", "jax", "cudnn", "pallas"),
                   help="default cudnn on GPU, xla otherwise")
    p.add_argument("--pairs_only", action="store_true",
                   help="print the attention pairs each GPU kernel computes for this batch (no model, no device)")
    p.add_argument("--remat", default="full", help='"none", "full" or a jax.checkpoint_policies name')
    p.add_argument("--lm_chunk", type=int, default=2048)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; tiny 2)")
    p.add_argument("--matmul", type=int, default=None, help="side of the reference matmul (default 8192; tiny 256)")
    p.add_argument("--no-record", dest="record", action="store_false")
    args = p.parse_args()
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from bbu_jax.models.flash_attention import padded_head_dim
    from bbu_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig

    def pick(value, full, tiny):
        return value if value is not None else (tiny if args.tiny else full)

    tokens, segments = pick(args.tokens, 8192, 256), pick(args.segments, 4, 2)
    image_side, steps = pick(args.image_side, 448, 112), pick(args.steps, 5, 2)
    dtype_name, mm_side = pick(args.dtype, "bfloat16", "float32"), pick(args.matmul, 8192, 256)
    dev = jax.devices()[0]
    attention = args.attention or ("cudnn" if dev.platform == "gpu" else "xla")
    cfg = tiny_config() if args.tiny else Qwen25VLConfig()
    dtype = jnp.dtype(dtype_name)

    if args.pairs_only:
        batch_np, seg_lens, grids = packed_batch(cfg, rows=args.rows, tokens=tokens, segments=segments,
                                                 image_side=image_side)
        t, v = cfg.text, cfg.vision
        n_full = len(v.fullatt_block_indexes)
        # forward FLOPs per pair, all layers of that kind (QK^T and PV: 4 x heads x head dim)
        def per_pair(name, impl):
            if name == "text":
                return 4 * t.num_attention_heads * t.head_dim * t.num_hidden_layers
            head_dim = padded_head_dim(v.head_dim) if impl == "pallas" else v.head_dim
            return 4 * v.num_heads * head_dim * (n_full if name == "vision full" else v.depth - n_full)

        print(f"attention pairs per layer, {args.rows} x {tokens} tokens, {segments} samples/row, one "
              f"{image_side}^2 image each: computed / needed, forward TFLOP over all layers")
        fwd = {}
        for impl in ("cudnn", "pallas"):
            for name, (computed, needed) in attention_pairs(batch_np, impl).items():
                flops = computed * per_pair(name, impl)
                fwd[impl] = fwd.get(impl, 0) + flops
                print(f"  {impl:7} {name:15} {computed / 1e6:8.4g} M / {needed / 1e6:8.4g} M = "
                      f"{computed / needed:5.2f}x   {flops / 1e12:8.4g} TFLOP")
        model = step_flops(cfg, segments=seg_lens, images=grids)
        print(f"model TFLOP per step (3 x forward, needed pairs only): {model / 1e12:.4g}; a step computes the "
              f"attention forward ~4.5x (forward, remat forward, backward ~2.5x)")
        print(f"attention_pairs: attention forward {fwd['cudnn'] / 1e12:.4g} TFLOP (cudnn) -> "
              f"{fwd['pallas'] / 1e12:.4g} TFLOP (pallas)")
        return

    t0 = time.perf_counter()
    with jax.default_device(dev):
        model = nnx.jit(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), compute_dtype=dtype,
                                         attention_impl=attention, remat=args.remat))()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    tx = optax.adamw(1e-5, weight_decay=0.01)
    opt_state = jax.jit(tx.init)(params)
    batch_np, seg_lens, grids = packed_batch(cfg, rows=args.rows, tokens=tokens, segments=segments,
                                             image_side=image_side)
    batch = jax.device_put(batch_np, dev)
    init_s = time.perf_counter() - t0

    step = jax.jit(lm_train_step(graphdef, rest, tx, lm_chunk=args.lm_chunk), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    losses, times = [], []
    for i in range(steps + 1):  # the first run is warm-up
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, batch)
        jax.block_until_ready((params, opt_state))
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite loss: {losses}")

    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((mm_side, mm_side)), dtype), dev)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    mm_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        mm_times.append(time.perf_counter() - t0)
    matmul_flops = 2 * mm_side**3 / statistics.median(mm_times)

    step_s = statistics.median(times)
    flops = step_flops(cfg, segments=seg_lens, images=grids)
    achieved = flops / step_s
    peak = next((v for (kind, dt), v in PEAKS.items() if kind in dev.device_kind and dt == dtype_name), None)
    peak_name = f"{peak / 1e12:.0f} TFLOP/s ({dev.device_kind} {dtype_name} datasheet)" if peak else None
    if peak is None:
        peak, peak_name = matmul_flops, f"{matmul_flops / 1e12:.3g} TFLOP/s (measured {dtype_name} matmul)"
    mfu = achieved / peak
    tokens_per_s = args.rows * tokens / step_s
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))

    print(f"{'tiny' if args.tiny else '3B'} Qwen2.5-VL ({n_params / 1e6:.1f} M params), {dtype_name} compute, "
          f"attention {attention}, remat {args.remat}, lm_chunk {args.lm_chunk}; {dev.device_kind}")
    print(f"rows {args.rows} x {tokens} tokens, {segments} samples/row, one {image_side}^2 image each "
          f"({batch_np['patches'].shape[1]} patches/row)")
    rows = [("init s", f"{init_s:.1f}"), ("compile s", f"{compile_s:.1f}"),
            ("step s (median)", f"{step_s:.4f}"), ("tokens/s/device", f"{tokens_per_s:.0f}"),
            ("model TFLOP/step", f"{flops / 1e12:.4g}"), ("achieved TFLOP/s", f"{achieved / 1e12:.4g}"),
            ("matmul TFLOP/s", f"{matmul_flops / 1e12:.4g}"), ("MFU vs peak", f"{mfu:.1%}"),
            ("of measured matmul", f"{achieved / matmul_flops:.1%}"),
            ("XLA temp GiB", f"{mem.temp_size_in_bytes / 2**30:.2f}" if mem else "n/a"),
            ("losses", " ".join(f"{x:.3f}" for x in losses))]
    for name, value in rows:
        print(f"  {name:20} {value}")
    headline = f"mfu: {mfu:.1%} of {peak_name}, {tokens_per_s:.0f} tokens/s/device"
    if not args.record:
        print(headline)
        return
    from benchmarks._common import record

    record("mfu", headline, tiny=args.tiny, rows=args.rows, tokens=tokens, segments=segments,
           image_side=image_side, dtype=dtype_name, attention=attention, remat=args.remat,
           lm_chunk=args.lm_chunk, params=n_params, step_s=step_s, times=times, tokens_per_s_per_device=tokens_per_s,
           model_flops=flops, achieved_flops=achieved, matmul_flops=matmul_flops, peak_flops=peak, mfu=mfu,
           compile_s=compile_s, xla_temp_gib=mem.temp_size_in_bytes / 2**30 if mem else None, losses=losses)


if __name__ == "__main__":
    main()
