"""Training throughput and MFU of the bbu_jax Qwen2.5-VL step (vision tower counted).

The real model (``Qwen25VL``, random weights, params float32, compute in ``--dtype``), the real
fused chunked LM loss and optax AdamW (``bbu_jax.perf.lm_step``), in one jitted step with the
state donated, on packed rows (``bbu_jax.perf.synthetic.packed_batch``): each row holds
``--segments`` samples, each one ``--image_side``^2 image followed by text, filling ``--tokens``
tokens (segment ids keep samples apart in both the decoder and the vision tower). One device
(``jax.devices()[0]``); multi-device sharding is the training loop's job. Row shape, compute
dtype, attention kernel (on GPU), remat and LM-loss chunk default to configs/base.py's.

MFU = model FLOPs / step time / peak. Model FLOPs: ``bbu_jax.training.flops.step_flops``, the count
the training log's MFU uses (useful matmul and attention work, x3 for training). Peak: the
datasheet dense rate of the device in ``--dtype`` and, alongside, a plain matmul measured in the
same run.

Attention (``--attention``): "xla" builds masked (B, H, L, L) scores (CPU reference); "cudnn"
(jax.nn.dot_product_attention, implementation="cudnn") is fused on GPU: scores are never
materialized, but it multiplies every (query, key) pair of the row (the segment mask travels as a
(B, 1, L, L) boolean -> bias operand); "pallas" (``flash_attention.segment_flash_attention``,
Triton) is fused and visits only the key blocks each query block can see. ``--pairs_only``
prints, without a model or device, the pairs each GPU kernel computes for the batch against the
pairs needed. Remat (``--remat``): "full" recomputes each layer in the backward pass (what 3B
rows of the run's length need), or a jax.checkpoint_policies name.

  python benchmarks/mfu.py                 # 3B shape, the run's row, one row (GPU)
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

import numpy as np  # noqa: E402

from benchmarks._common import record, run_specs  # noqa: E402

# Datasheet dense peak FLOP/s by device kind substring and compute dtype.
PEAKS = {("H100", "bfloat16"): 989e12, ("H200", "bfloat16"): 989e12, ("H100", "float32"): 67e12,
         ("H200", "float32"): 67e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model and rows (CPU, CI); not for timing")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per row (default: the run's token budget; tiny 256)")
    p.add_argument("--segments", type=int, default=None,
                   help="samples per row (default: the run's segments per row; tiny 2)")
    p.add_argument("--image_side", type=int, default=None, help="pixels (default 448; tiny 112)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="default: the run's compute dtype; tiny float32")
    p.add_argument("--attention", default=None, choices=("xla", "jax", "cudnn", "pallas"),
                   help="default: the run's kernel on GPU, xla otherwise")
    p.add_argument("--pairs_only", action="store_true",
                   help="print the attention pairs each GPU kernel computes for this batch (no model, no device)")
    p.add_argument("--remat", default=None,
                   help='"none", "full" or a jax.checkpoint_policies name (default: the run\'s)')
    p.add_argument("--lm_chunk", type=int, default=None, help="default: the run's")
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
    from bbu_jax.training.flops import attention_pairs, step_flops
    from bbu_jax.perf.lm_step import lm_train_step
    from bbu_jax.perf.synthetic import packed_batch, tiny_config

    def pick(value, full, tiny):
        return value if value is not None else (tiny if args.tiny else full)

    run = run_specs()
    tokens = pick(args.tokens, run.data.token_budget, 256)
    segments = pick(args.segments, run.data.segments_per_row, 2)
    image_side, steps = pick(args.image_side, 448, 112), pick(args.steps, 5, 2)
    dtype_name, mm_side = pick(args.dtype, run.model.compute_dtype, "float32"), pick(args.matmul, 8192, 256)
    remat, lm_chunk = args.remat or run.model.remat_policy, args.lm_chunk or run.loss.lm_chunk
    dev = jax.devices()[0]
    attention = args.attention or (run.model.attention_impl if dev.platform == "gpu" else "xla")
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
                                         attention_impl=attention, remat=remat))()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    tx = optax.adamw(1e-5, weight_decay=0.01)
    opt_state = jax.jit(tx.init)(params)
    batch_np, seg_lens, grids = packed_batch(cfg, rows=args.rows, tokens=tokens, segments=segments,
                                             image_side=image_side)
    batch = jax.device_put(batch_np, dev)
    init_s = time.perf_counter() - t0

    step = jax.jit(lm_train_step(graphdef, rest, tx, lm_chunk=lm_chunk), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - t0
    print(f"compile: {compile_s:.1f} s (init {init_s:.1f} s)")  # as they happen: a GPU session streams them
    mem = compiled.memory_analysis()
    losses, times = [], []
    for i in range(steps + 1):  # the first run is warm-up
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, batch)
        jax.block_until_ready((params, opt_state))
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
        losses.append(float(loss))
        print(f"step {i}{' (warm-up)' if not i else ''}: {dt:.4f} s, loss {losses[-1]:.4f}")
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
          f"attention {attention}, remat {remat}, lm_chunk {lm_chunk}; {dev.device_kind}")
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
    record("mfu", headline, tiny=args.tiny, rows=args.rows, tokens=tokens, segments=segments,
           image_side=image_side, dtype=dtype_name, attention=attention, remat=remat,
           lm_chunk=lm_chunk, params=n_params, step_s=step_s, times=times, tokens_per_s_per_device=tokens_per_s,
           model_flops=flops, achieved_flops=achieved, matmul_flops=matmul_flops, peak_flops=peak, mfu=mfu,
           compile_s=compile_s, xla_temp_gib=mem.temp_size_in_bytes / 2**30 if mem else None, losses=losses)


if __name__ == "__main__":
    main()
