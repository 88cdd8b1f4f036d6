"""Training throughput and MFU of the product's train step: Qwen2.5-VL + detection head, packed rows.

The step a run compiles (``bbu_jax.perf.lowering.product_step``: workflows.train's per-group
AdamW, the task's loss -- chunked LM loss, detection head, Hungarian matcher --, the non-finite
guard and the per-group norms, jitted with the state donated) on modules built as the run builds
them from the typed specs of ``--config`` (default configs/base.py), with random weights of the
3B shape (``--hf_dir``: a real folder's weights through the run's loader; ``--tiny``: the tiny
test model and configs/demo.py, CPU). Its batches come from the run's own train iterator (packer,
budgets, teacher sampling) over field-like photos made here (``perf.synthetic.with_synthetic_data``;
without ``--hf_dir`` the tiny test tokenizer, whose zh text runs longer than Qwen's; ``--tiny``:
the demo's small scenes, which its budgets were made for).
Every step gets its own batch; one row per device by default, on ``jax.devices()[:--devices]``
as an FSDP mesh.

MFU two ways, against the device's datasheet dense peak in the compute dtype (or, where unknown,
a plain matmul measured in the same run):
- model FLOPs (``bbu_jax.training.flops.batch_flops`` of each step's batch, the count the
  training log's MFU uses): the work the model needs -- decoder per real token, LM head per
  supervised token, vision tower per real patch, merger, attention pairs inside each sample /
  window, detection head; x3 for training. Padding, remat and masked pairs are not counted.
- hardware FLOPs (``bbu_jax.perf.hlo_flops.executed_flops`` of the compiled step): every matrix
  product the compiled step runs, layer loops times their trip counts, remat included;
  conditionals at their largest branch (an upper bound: the LM loss skips chunks without
  supervised tokens); fused attention kernels (cuDNN, Triton) are custom calls whose products it
  cannot see (listed). XLA's own ``cost_analysis()["flops"]`` counts each loop body once: printed
  beside it for reference, not used.

Attention (``--attention``): "xla" builds masked scores (CPU reference); "cudnn" is fused but
multiplies every (query, key) pair of the row; "pallas" (Triton) visits only the key blocks each
query block can see. ``--pairs_only`` prints, without a model, the pairs each GPU kernel computes
for the first batch against the pairs needed. Remat (``--remat``): any name the config accepts.

  python benchmarks/mfu.py                 # 3B, configs/base.py's step and budgets, one row (GPU)
  python benchmarks/mfu.py --attention pallas --remat full
  python benchmarks/mfu.py --pairs_only    # attention work per kernel (any machine)
  python benchmarks/mfu.py --tiny          # configs/demo.py's tiny run, CPU (CI; not for timing)

Last line: `mfu: X% of PEAK TFLOP/s (...), N tokens/s/device` (real tokens, not padding).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bbu_jax.foundation.xla_flags import set_gpu_flags  # noqa: E402

set_gpu_flags()  # the product's GPU flags are part of the step measured; before jax starts

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks._common import BASE_CONFIG, ROOT, record, run_specs  # noqa: E402

# Datasheet dense peak FLOP/s by device kind substring and compute dtype.
PEAKS = {("H100", "bfloat16"): 989e12, ("H200", "bfloat16"): 989e12, ("H100", "float32"): 67e12,
         ("H200", "float32"): 67e12}
DEMO_CONFIG = ROOT / "configs" / "demo.py"


def measure_specs(args, devices: int):
    """The config's specs with this measurement's overrides: rows, kernel, remat, dtype, chunk,
    budgets, the mesh, and the loader in this process."""
    specs = run_specs(args.config or (DEMO_CONFIG if args.tiny else BASE_CONFIG))
    m, d, loss = specs.model, specs.data, specs.loss
    return dataclasses.replace(
        specs,
        model=dataclasses.replace(m, attention_impl=args.attention or m.attention_impl,
                                  remat_policy=args.remat or m.remat_policy,
                                  compute_dtype=args.dtype or m.compute_dtype),
        loss=dataclasses.replace(loss, lm_chunk=args.lm_chunk or loss.lm_chunk),
        data=dataclasses.replace(d, batch_rows=args.rows * devices, workers=0,
                                 token_budget=args.tokens or d.token_budget,
                                 patch_budget=args.patches or d.patch_budget,
                                 segments_per_row=args.segments or d.segments_per_row,
                                 pack_buffer=args.pack_buffer or d.pack_buffer),
        mesh=dataclasses.replace(specs.mesh, data=1, fsdp=devices, tensor=1))


def print_pairs(cfg, batch: dict, model_flops: float) -> None:
    """The attention pairs each GPU kernel multiplies for ``batch`` against those needed."""
    from bbu_jax.models.flash_attention import padded_head_dim
    from bbu_jax.training.flops import attention_pairs

    t, v = cfg.text, cfg.vision
    n_full = len(v.fullatt_block_indexes)

    def per_pair(name, impl):  # forward FLOPs per pair, all layers of that kind (QK^T and PV)
        if name == "text":
            return 4 * t.num_attention_heads * t.head_dim * t.num_hidden_layers
        head_dim = padded_head_dim(v.head_dim) if impl == "pallas" else v.head_dim
        return 4 * v.num_heads * head_dim * (n_full if name == "vision full" else v.depth - n_full)

    rows, tokens = batch["segment_ids"].shape
    print(f"attention pairs per layer, {rows} x {tokens} tokens ({int((batch['segment_ids'] > 0).sum())} real, "
          f"{int(batch['segment_valid'].sum())} samples): computed / needed, forward TFLOP over all layers")
    fwd = {}
    for impl in ("cudnn", "pallas"):
        for name, (computed, needed) in attention_pairs(batch, impl).items():
            flops = computed * per_pair(name, impl)
            fwd[impl] = fwd.get(impl, 0) + flops
            print(f"  {impl:7} {name:15} {computed / 1e6:8.4g} M / {needed / 1e6:8.4g} M = "
                  f"{computed / needed:5.2f}x   {flops / 1e12:8.4g} TFLOP")
    print(f"model TFLOP per step (3 x forward, needed pairs only): {model_flops / 1e12:.4g}; a step computes the "
          f"attention forward ~4.5x (forward, remat forward, backward ~2.5x)")
    print(f"attention_pairs: attention forward {fwd['cudnn'] / 1e12:.4g} TFLOP (cudnn) -> "
          f"{fwd['pallas'] / 1e12:.4g} TFLOP (pallas)")


def matmul_rate(side: int, dtype, dev) -> float:
    """FLOP/s of a plain (side x side) matmul on ``dev``: the reachable rate where no datasheet is known."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((side, side)), dtype), dev)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * side**3 / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model, configs/demo.py (CPU, CI); not for timing")
    p.add_argument("--config", default=None, help="the run's config file (default: configs/base.py; tiny: demo.py)")
    p.add_argument("--rows", type=int, default=1, help="rows per device")
    p.add_argument("--devices", type=int, default=1, help="devices of the FSDP mesh (jax.devices()[:N])")
    p.add_argument("--tokens", type=int, default=None, help="token budget per row (default: the config's)")
    p.add_argument("--patches", type=int, default=None, help="patch budget per row (default: the config's)")
    p.add_argument("--segments", type=int, default=None, help="samples per row at most (default: the config's)")
    p.add_argument("--photos", type=int, default=40, help="synthetic photos the batches are packed from")
    p.add_argument("--hf_dir", default=None,
                   help="a Qwen2.5-VL folder: its weights and tokenizer (default: random 3B weights, tiny tokenizer)")
    p.add_argument("--pack_buffer", type=int, default=None, help="default: the config's")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default: the config's")
    p.add_argument("--attention", default=None, choices=("xla", "jax", "cudnn", "pallas"),
                   help="default: the config's (xla when not on a GPU)")
    p.add_argument("--pairs_only", action="store_true",
                   help="print the attention pairs each GPU kernel computes for the first batch (no model, no device)")
    p.add_argument("--remat", default=None, help="a remat policy name the config accepts (default: the config's)")
    p.add_argument("--lm_chunk", type=int, default=None, help="default: the config's")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; tiny 2)")
    p.add_argument("--matmul", type=int, default=None, help="side of the reference matmul (default 8192; tiny 256)")
    p.add_argument("--profile", default=None,
                   help="trace one more step with jax.profiler, write its Perfetto trace (.json.gz) here and "
                        "print where the device time went")
    p.add_argument("--no-record", dest="record", action="store_false")
    args = p.parse_args()
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # the product's own log lines (remat "auto": each candidate's memory and the choice)
    product_log = logging.getLogger("bbu_jax")
    product_log.setLevel(logging.INFO)
    product_log.addHandler(logging.StreamHandler(sys.stdout))
    product_log.propagate = False  # once, whatever handlers the root logger gets later

    import jax
    import jax.numpy as jnp

    from bbu_jax.data.pipeline import make_train_iterator
    from bbu_jax.foundation import sharding
    from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig
    from bbu_jax.perf import kernel_times
    from bbu_jax.perf.hlo_flops import executed_flops
    from bbu_jax.perf.lowering import product_step, random_modules
    from bbu_jax.perf.memory import memory_summary
    from bbu_jax.data.synthetic import write_labelme_dataset
    from bbu_jax.perf.synthetic import with_synthetic_data
    from bbu_jax.training import loop, task, train_state
    from bbu_jax.training.flops import batch_flops, head_param_count
    from bbu_jax.training.step import accumulated_batch_sharding
    from bbu_jax.workflows import train

    devices = jax.devices()[:args.devices]
    dev = devices[0]
    if args.attention is None and dev.platform != "gpu":
        args.attention = "xla"  # the fused kernels are GPU kernels
    steps, mm_side = args.steps or (2 if args.tiny else 5), args.matmul or (256 if args.tiny else 8192)
    specs = measure_specs(args, len(devices))

    # --- data: the run's train iterator over synthetic photos ---
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()  # data and the tiny model; removed when the process ends
    # tiny: the demo run's small scenes, which its budgets were made for
    specs = with_synthetic_data(specs, tmp.name, args.photos, hf_dir=args.hf_dir,
                                scenes=write_labelme_dataset if args.tiny else None)
    weights = args.tiny or args.hf_dir  # else random weights of the 3B shape
    cfg = Qwen25VLConfig.from_file(Path(specs.model.hf_dir) / "config.json") if weights else Qwen25VLConfig()
    encoder = train.make_encoder(specs)
    vocab = train.caption_vocab(specs, encoder, Path(tmp.name))
    it = make_train_iterator(specs.data, encoder, seed=specs.run.seed)
    host = [loop.next_step_batch(it, specs.optim.grad_accum_steps) for _ in range(steps + 1)]
    if hasattr(it, "close"):
        it.close()
    data_s = time.perf_counter() - t0
    real_tokens = [int((h["segment_ids"] > 0).sum()) for h in host]
    m, d = specs.model, specs.data
    print(f"{'tiny' if args.tiny else '3B'} Qwen2.5-VL + detection head, {m.compute_dtype} compute, attention "
          f"{m.attention_impl}, remat {m.remat_policy}, lm_chunk {specs.loss.lm_chunk}; {len(devices)} x "
          f"{dev.device_kind}; {d.batch_rows} row(s) x {d.token_budget} tokens / {d.patch_budget} patches, "
          f"<= {d.segments_per_row} samples per row, from {args.photos} {'demo' if args.tiny else 'field-like'} "
          f"photos ({data_s:.1f} s)")
    if args.pairs_only:
        head_params = head_param_count(train_state.split_modules(random_modules(specs, cfg, abstract=True))[1])
        print_pairs(cfg, {k: v[0] for k, v in host[0].items()}, batch_flops(cfg, host[0], head_params=head_params))
        return

    # --- the product's step on random weights of the model's shape ---
    t0 = time.perf_counter()
    mesh = sharding.make_mesh(1, len(devices), 1, devices)
    modules = (task.build_modules(specs.model, specs.head, seed=specs.run.seed, mesh=mesh) if weights
               else random_modules(specs, cfg))
    step = product_step(specs, modules, mesh, caption_vocab=vocab)
    params = train_state.split_modules(modules)[1]
    del modules
    state = train_state.create_state(params, step.tx, specs.run.seed, step.shardings)
    del params
    head_params = head_param_count(state["params"])
    flops = [batch_flops(cfg, h, head_params=head_params) for h in host]
    batch_sharding = accumulated_batch_sharding(mesh)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # --tiny is a CI check of the code path, not a timing: LLVM's optimizations would double its compile
    options = {"xla_backend_optimization_level": 0} if args.tiny else None
    compiled = step.fn if isinstance(step.fn, jax.stages.Compiled) else step.fn.lower(  # remat "auto" compiled it
        state, loop.to_global(host[0], batch_sharding)).compile(compiler_options=options)
    compile_s = time.perf_counter() - t0
    print(f"compile: {compile_s:.1f} s (init {init_s:.1f} s)")  # as they happen: a GPU session streams them
    hw_flops, hidden = executed_flops(compiled.as_text())
    xla_flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    mem = memory_summary(compiled)

    losses, times, skipped = [], [], 0
    for i, h in enumerate(host):  # the first run is warm-up
        batch = loop.to_global(h, batch_sharding)
        t0 = time.perf_counter()
        state, out = compiled(state, batch)
        jax.block_until_ready(state)
        dt = time.perf_counter() - t0
        out = jax.device_get(out)
        loss_sum, loss_n = out["metrics"]["loss"]
        losses.append(float(loss_sum / max(loss_n, 1.0)))
        skipped += int(not out["ok"])
        if i:
            times.append(dt)
        print(f"step {i}{' (warm-up)' if not i else ''}: {dt:.4f} s, loss {losses[-1]:.4f}"
              f"{'' if out['ok'] else ' (skipped: non-finite)'}")
    if skipped or not all(np.isfinite(losses)):
        raise RuntimeError(f"{skipped} step(s) skipped as non-finite; losses {losses}")

    if args.profile:  # one more step, traced: kernels by kind and by name
        with tempfile.TemporaryDirectory() as trace_dir:
            batch = loop.to_global(host[-1], batch_sharding)
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                t0 = time.perf_counter()
                state, _ = compiled(state, batch)
                jax.block_until_ready(state)
                traced_s = time.perf_counter() - t0
            Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kernel_times.trace_file(trace_dir), args.profile)
        print(f"profile: one traced step {traced_s:.4f} s, trace {args.profile}")
        for line in kernel_times.summary_lines(args.profile, traced_s):
            print(line)

    step_s = statistics.median(times)
    model_flops = float(np.mean(flops[1:]))
    matmul_flops = matmul_rate(mm_side, jnp.dtype(m.compute_dtype), dev)
    peak = next((v for (kind, dt), v in PEAKS.items() if kind in dev.device_kind and dt == m.compute_dtype), None)
    peak_name = f"{peak / 1e12:.0f} TFLOP/s ({dev.device_kind} {m.compute_dtype} datasheet)" if peak else None
    if peak is None:
        peak, peak_name = matmul_flops, f"{matmul_flops / 1e12:.3g} TFLOP/s (measured {m.compute_dtype} matmul)"
    n = len(devices)
    mfu = model_flops / step_s / (peak * n)
    hfu = hw_flops * n / step_s / (peak * n)  # the compiled module is one device's program
    tokens_per_s = float(np.mean(real_tokens[1:])) / step_s / n
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))
    rows = [("params M", f"{n_params / 1e6:.1f} (head {head_params / 1e6:.2f})"), ("remat", step.remat),
            ("init s", f"{init_s:.1f}"), ("compile s", f"{compile_s:.1f}"),
            ("step s (median)", f"{step_s:.4f}"), ("tokens/s/device", f"{tokens_per_s:.0f} real tokens"),
            ("token fill", f"{np.mean(real_tokens[1:]) / (d.batch_rows * d.token_budget):.1%}"),
            ("model TFLOP/step", f"{model_flops / 1e12:.4g} (training log's count)"),
            ("hw TFLOP/step",
             f"{hw_flops * n / 1e12:.4g} (compiled products; {hw_flops * n / model_flops:.2f}x model)"),
            ("uncounted kernels", ", ".join(f"{k} x{v}" for k, v in sorted(hidden.items())) or "none"),
            ("XLA cost_analysis", f"{xla_flops * n / 1e12:.4g} TFLOP (loop bodies once; not used)"),
            ("matmul TFLOP/s", f"{matmul_flops / 1e12:.4g}"),
            ("MFU vs peak", f"{mfu:.1%} (model FLOPs)"), ("HFU vs peak", f"{hfu:.1%} (hardware FLOPs)"),
            ("of measured matmul", f"{model_flops / step_s / n / matmul_flops:.1%} (model FLOPs)"),
            ("memory GiB/device", ", ".join(f"{k} {v:.2f}" for k, v in mem.items())),
            ("losses", " ".join(f"{x:.3f}" for x in losses))]
    for name, value in rows:
        print(f"  {name:20} {value}")
    headline = f"mfu: {mfu:.1%} of {peak_name}, {tokens_per_s:.0f} tokens/s/device"
    if not args.record:
        print(headline)
        return
    record("mfu", headline, tiny=args.tiny, devices=n, rows=d.batch_rows, token_budget=d.token_budget,
           patch_budget=d.patch_budget, segments=d.segments_per_row, photos=args.photos, dtype=m.compute_dtype,
           attention=m.attention_impl, remat=step.remat, lm_chunk=specs.loss.lm_chunk, params=n_params,
           step_s=step_s, times=times, tokens_per_s_per_device=tokens_per_s, real_tokens=real_tokens,
           model_flops=model_flops, hw_flops=hw_flops * n, xla_cost_analysis_flops=xla_flops * n,
           uncounted_custom_calls=hidden, matmul_flops=matmul_flops, peak_flops=peak, mfu=mfu, hfu=hfu,
           compile_s=compile_s, memory_gib=mem, losses=losses)


if __name__ == "__main__":
    main()
