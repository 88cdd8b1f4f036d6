"""Compile time of the product's train step vs depth: scanned layers keep it flat, unrolled ones grow.

The step ``scripts/train.py`` runs (``bbu_jax.perf.lowering.lower_train_step``: Qwen2.5-VL + the detection head of
``configs/base.py``, its loss weights and remat, AdamW per parameter group, NaN guard; bf16
compute), at a tiny width, for 2 text layers / 2 vision blocks and for the 3B's depths
(``Qwen25VLConfig()``), with the layer loops scanned (``scan_layers=True``, the 3B default) and
unrolled. Abstract modules: nothing is allocated, only traced, lowered and compiled (for this machine's backend; on a
GPU the XLA passes differ but the scaling in depth is the same question). Prints a table (trace +
lower and XLA compile seconds) and a last line
``compile_time: DEEP-layer/2-layer = RATIO (scanned train step)``. Run:
    python benchmarks/compile_time.py [--repeats 2] [--no-unrolled]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks._common import record, run_specs  # noqa: E402
from bbu_jax.foundation import sharding  # noqa: E402
from bbu_jax.models.detection_head import DetectionHead  # noqa: E402
from bbu_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig  # noqa: E402
from bbu_jax.perf.synthetic import tiny_config  # noqa: E402
from bbu_jax.perf.lowering import lower_train_step  # noqa: E402

DIMS = dict(B=1, L=256, P=256, S=2, M=8, C=8, NV=64, NT=16)  # tiny budgets: compile time barely depends on them
THREE_B = Qwen25VLConfig()
DEEP = THREE_B.text.num_hidden_layers
DEPTHS = ((2, 2), (DEEP, THREE_B.vision.depth))  # (text layers, vision blocks): smallest, the 3B's


def config(text_layers: int, vision_depth: int) -> Qwen25VLConfig:
    """The tiny widths at this depth, full-attention blocks where the 3B has them."""
    tiny = tiny_config()
    full = tuple(i for i in THREE_B.vision.fullatt_block_indexes if i < vision_depth) or (vision_depth - 1,)
    return dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, num_hidden_layers=text_layers),
                               vision=dataclasses.replace(tiny.vision, depth=vision_depth, fullatt_block_indexes=full))


def measure(run, cfg: Qwen25VLConfig, scan_layers: bool) -> tuple[float, float]:
    """(trace + lower, compile) seconds of the product's train step (``run``: the run's specs)."""
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    modules = {
        "model": nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), compute_dtype=jnp.bfloat16,
                                                 attention_impl="xla", remat=run.model.remat_policy,
                                                 scan_layers=scan_layers)),
        "head": nnx.eval_shape(lambda: DetectionHead(
            dataclasses.replace(run.head, max_caption_len=DIMS["C"]), llm_hidden=cfg.text.hidden_size,
            attention_impl="xla", dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))}
    t0 = time.perf_counter()
    specs = dataclasses.replace(run, loss=dataclasses.replace(run.loss, lm_chunk=128))
    lowered = lower_train_step(specs, modules, mesh, DIMS, caption_vocab=np.arange(64, dtype=np.int32))
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="best of N (the machine may be shared)")
    parser.add_argument("--no-unrolled", dest="unrolled", action="store_false",
                        help="only the scanned step (the unrolled 3B depth compiles for minutes on a few cores)")
    parser.add_argument("--no-record", dest="record", action="store_false")
    args = parser.parse_args()
    modes = ("scanned", "unrolled") if args.unrolled else ("scanned",)
    run = run_specs()
    remat = run.model.remat_policy
    print(f"backend: {jax.default_backend()}  devices: {jax.device_count()}  best of {args.repeats}; "
          f"product train step with the detection head, bf16 compute, remat {remat}, tiny width")
    best: dict[tuple[int, str], tuple[float, float]] = {}
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for (text_layers, vision_depth), mode in itertools.product(DEPTHS, modes):
            t = measure(run, config(text_layers, vision_depth), scan_layers=mode == "scanned")
            best[text_layers, mode] = min(best.get((text_layers, mode), t), t, key=sum)
    print(f"{'text layers':>11} {'vision depth':>12} {'layers':>9} {'trace+lower s':>14} {'compile s':>10} "
          f"{'total s':>8}")
    for ((text_layers, vision_depth), mode) in itertools.product(DEPTHS, modes):
        lower, comp = best[text_layers, mode]
        print(f"{text_layers:>11} {vision_depth:>12} {mode:>9} {lower:>14.2f} {comp:>10.2f} {lower + comp:>8.2f}")
    total = {k: sum(v) for k, v in best.items()}
    ratios = {mode: total[DEEP, mode] / total[2, mode] for mode in modes}
    if args.unrolled:
        print(f"unrolled: {DEEP}-layer/2-layer = {ratios['unrolled']:.2f}; at {DEEP} layers scanned/unrolled = "
              f"{total[DEEP, 'scanned'] / total[DEEP, 'unrolled']:.2f}")
    headline = f"compile_time: {DEEP}-layer/2-layer = {ratios['scanned']:.2f} (scanned train step)"
    if not args.record:
        print(headline)
        return
    record("compile_time", headline,
           what=f"train step (perf.lowering.lower_train_step), detection head, bf16, remat {remat}",
           seconds={f"{k[0]}-layer {k[1]}": round(v, 2) for k, v in total.items()},
           ratios={k: round(v, 2) for k, v in ratios.items()}, repeats=args.repeats)


if __name__ == "__main__":
    main()
