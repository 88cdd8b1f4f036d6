"""What one train step sends between devices, for the 3B on a multi-GPU mesh, measured without GPUs.

The product's step (``bbu_jax.perf.lowering.lower_train_step``: the run's loss, here the language loss, its optimizer and
jit) on abstract params of the real Qwen2.5-VL-3B shape is compiled for
``--mesh`` fake CPU devices; ``bbu_jax.perf.collectives`` then reads the module the SPMD partitioner
produced (the same partitioner runs on GPU) and sums each collective kind's bytes per step, loops
counted by their trip counts. Nothing is allocated or run, so this works on a laptop.

Reference volumes, as multiples of the f32 parameter bytes P: data parallel reduces the gradient
once (all-reduce = 1 P); FSDP gathers each weight for the forward, the rematerialized forward and
the backward (3 gathers: 1.5 P in bf16, 3 P in f32) and reduces the gradient once (1 P).
``--link_gbs`` turns bytes into a lower bound on time with ring algorithms (all-reduce moves
2(n-1)/n of the bytes per device, all-gather and reduce-scatter (n-1)/n), to compare with the
step's compute.

  python benchmarks/collectives.py                  # 3B, FSDP over 8 (1 x 8 x 1), the run's rows
  python benchmarks/collectives.py --mesh 8 1 1     # data parallel
  python benchmarks/collectives.py --tiny           # tiny model (CI)

Last line: `collectives: MESH step sends X GiB all-reduce (A x params), Y GiB all-gather (B x params)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record, run_specs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", type=int, nargs=3, default=(1, 8, 1), metavar=("DATA", "FSDP", "TENSOR"))
    p.add_argument("--tiny", action="store_true", help="tiny model and rows (CI)")
    p.add_argument("--rows_per_device", type=int, default=1)
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per row (default: the run's token budget; tiny 256)")
    p.add_argument("--segments", type=int, default=None,
                   help="samples per row (default: the run's segments per row; tiny 2)")
    p.add_argument("--image_side", type=int, default=None, help="pixels (default 448; tiny 112)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default: the run's compute dtype")
    p.add_argument("--remat", default=None, help="default: the run's")
    p.add_argument("--lm_chunk", type=int, default=None, help="default: the run's")
    p.add_argument("--link_gbs", type=float, default=450.0,
                   help="per-GPU link bandwidth, GB/s one way (H100 SXM NVLink: 450)")
    p.add_argument("--no-record", dest="record", action="store_false")
    args = p.parse_args()
    devices = args.mesh[0] * args.mesh[1] * args.mesh[2]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax.numpy as jnp
    from flax import nnx

    from bbu_jax.foundation import sharding
    from bbu_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
    from bbu_jax.perf import collectives
    from bbu_jax.perf.synthetic import packed_batch, tiny_config

    run = run_specs()
    tokens = args.tokens or (256 if args.tiny else run.data.token_budget)
    segments = args.segments or (2 if args.tiny else run.data.segments_per_row)
    image_side = args.image_side or (112 if args.tiny else 448)
    dtype_name, remat = args.dtype or run.model.compute_dtype, args.remat or run.model.remat_policy
    lm_chunk = args.lm_chunk or run.loss.lm_chunk
    cfg = tiny_config() if args.tiny else Qwen25VLConfig()
    mesh = sharding.make_mesh(*args.mesh)
    dtype = jnp.dtype(dtype_name)

    t0 = time.perf_counter()
    modules = {"model": nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), compute_dtype=dtype,
                                                        attention_impl="xla", remat=remat))}
    rows = args.rows_per_device * args.mesh[0] * args.mesh[1]
    one_row, _, _ = packed_batch(cfg, rows=1, tokens=tokens, segments=segments, image_side=image_side)
    dims = dict(B=rows, L=tokens, P=one_row["patches"].shape[1], S=segments, M=1, C=1, NV=1, NT=1)
    # no head module: the step's loss is the language loss alone
    specs = dataclasses.replace(run, loss=dataclasses.replace(run.loss, lm_chunk=lm_chunk))
    sent, param_bytes = collectives.train_step_traffic(specs, modules, mesh, dims, caption_vocab=None)
    compile_s = time.perf_counter() - t0
    ring = {"all-reduce": 2.0, "all-gather": 1.0, "reduce-scatter": 1.0, "all-to-all": 1.0,
            "collective-permute": 1.0}
    mesh_name = "x".join(map(str, args.mesh))
    print(f"{'tiny' if args.tiny else '3B'} Qwen2.5-VL, mesh data x fsdp x tensor = {mesh_name}, "
          f"{args.rows_per_device} row(s) of {tokens} tokens per device, {segments} samples/row, "
          f"{image_side}^2 images, {dtype_name} compute, remat {remat}; f32 params "
          f"{param_bytes / 2**30:.2f} GiB; compiled in {compile_s:.0f} s on {devices} fake CPU devices")
    print(f"{'collective':20} {'GiB/step':>9} {'x params':>9} {'ms at ' + str(int(args.link_gbs)) + ' GB/s':>14}")
    seconds = 0.0
    for kind, n in sent.items():
        s = ring[kind] * (devices - 1) / devices * n / (args.link_gbs * 1e9)
        seconds += s
        print(f"{kind:20} {n / 2**30:9.3g} {n / param_bytes:9.2f} {s * 1e3:14.1f}")
    print(f"{'total':20} {sum(sent.values()) / 2**30:9.3g} {sum(sent.values()) / param_bytes:9.2f} "
          f"{seconds * 1e3:14.1f}")
    reduced = sent["all-reduce"] + sent["reduce-scatter"]
    headline = (f"collectives: {mesh_name} step sends {reduced / 2**30:.3g} GiB reduced "
                f"({reduced / param_bytes:.2f} x params), {sent['all-gather'] / 2**30:.3g} GiB gathered "
                f"({sent['all-gather'] / param_bytes:.2f} x params)")
    if not args.record:
        print(headline)
        return
    record("collectives", headline, tiny=args.tiny, mesh=list(args.mesh), rows_per_device=args.rows_per_device,
           tokens=tokens, segments=segments, image_side=image_side, dtype=dtype_name, remat=remat,
           lm_chunk=lm_chunk, param_bytes=param_bytes, bytes=sent, link_gbs=args.link_gbs,
           ring_seconds=seconds, compile_s=compile_s)


if __name__ == "__main__":
    main()
