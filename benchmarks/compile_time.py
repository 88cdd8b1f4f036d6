"""Compile time of the Qwen2.5-VL forward vs depth: nnx.scan should keep it flat.

Tiny width (the test checkpoint's), random weights, one image-sized patch budget. Prints a table
(trace+lower and XLA compile seconds, forward and forward+grad) and a last line
``compile_time: 36-layer/2-layer = RATIO`` (forward, total). Run:
    python benchmarks/compile_time.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record  # noqa: E402
from bbu_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, TextConfig, VisionConfig

TINY_TEXT = TextConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3))
TINY_VISION = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=(1,))


def config(text_layers: int, vision_depth: int) -> Qwen25VLConfig:
    full = tuple(i for i in (7, 15, 23, 31) if i < vision_depth) or (vision_depth - 1,)
    return Qwen25VLConfig(text=dataclasses.replace(TINY_TEXT, num_hidden_layers=text_layers),
                          vision=dataclasses.replace(TINY_VISION, depth=vision_depth, fullatt_block_indexes=full))


def batch(b: int = 2, l: int = 128, p: int = 256) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return dict(
        input_ids=jnp.asarray(rng.integers(0, 600, (b, l)), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, 3, l)),
        segment_ids=jnp.ones((b, l), jnp.int32),
        patches=jnp.asarray(rng.normal(size=(b, p, 1176)), jnp.float32),
        patch_pos=jnp.asarray(rng.integers(0, 16, (b, p, 2)), jnp.int32),
        patch_window_ids=jnp.asarray(np.repeat(np.arange(p // 64) + 1, 64)[None].repeat(b, 0), jnp.int32),
        patch_image_ids=jnp.ones((b, p), jnp.int32),
        vision_token_index=jnp.asarray(np.where(np.arange(l) < p // 4, np.arange(l), -1)[None].repeat(b, 0),
                                       jnp.int32))


def measure(cfg: Qwen25VLConfig, grad: bool) -> tuple[float, float]:
    graphdef, state = nnx.split(Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    inputs = batch()

    def loss(s):
        m = nnx.merge(graphdef, s)
        return jnp.mean(m.logits(m(**inputs)) ** 2)

    fn = jax.jit(jax.grad(loss) if grad else loss)
    t0 = time.perf_counter()
    lowered = fn.lower(state)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of N (the machine may be shared)")
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()}  devices: {jax.device_count()}  best of {args.repeats}")
    print(f"{'text layers':>11} {'vision depth':>12} {'mode':>9} {'trace+lower s':>14} "
          f"{'compile s':>10} {'total s':>8}")
    depths = ((2, 2), (36, 32))
    best: dict[tuple[int, str], tuple[float, float]] = {}
    for _ in range(args.repeats):  # interleaved, so load changes hit both depths alike
        for (text_layers, vision_depth), grad in itertools.product(depths, (False, True)):
            key = (text_layers, "fwd+grad" if grad else "forward")
            t = measure(config(text_layers, vision_depth), grad)
            best[key] = min(best.get(key, t), t, key=sum)
    for (text_layers, vision_depth), mode in itertools.product(depths, ("forward", "fwd+grad")):
        lower, comp = best[text_layers, mode]
        print(f"{text_layers:>11} {vision_depth:>12} {mode:>9} {lower:>14.2f} {comp:>10.2f} {lower + comp:>8.2f}")
    total = {k: sum(v) for k, v in best.items()}
    grad_ratio = total[36, "fwd+grad"] / total[2, "fwd+grad"]
    ratio = total[36, "forward"] / total[2, "forward"]
    print(f"fwd+grad: 36-layer/2-layer = {grad_ratio:.2f}")
    record("compile_time", f"compile_time: 36-layer/2-layer = {ratio:.2f}",
           seconds={f"{k[0]}-layer {k[1]}": round(v, 2) for k, v in total.items()}, grad_ratio=round(grad_ratio, 2))


if __name__ == "__main__":
    main()
