"""Forward+backward time of the detection head + its losses at the 3B widths, and the matcher's share.

Sizes (3B): LLM hidden 2048, head width 256, 6 decoder layers, 8 heads, MLP 1024, Q 100 queries,
one row of L 8192 tokens holding S 8 segments, NV 512 vision + NT 64 text memory tokens per
segment, M 64 objects per segment (all valid), C 24 caption tokens, caption vocabulary K 1024 of a
151,936 x 2048 embedding table. Gradients w.r.t. the head parameters and the hidden states (the
embedding table's gradient is a K-row scatter into the LLM's own table gradient, not timed here).
The LM loss is not part of this measurement.

Rows: the jitted step with the scipy matcher (host callback), the time spent inside that host
callback during the step (timed by wrapping it), and the same step with the on-device optax
matcher. Run:
    python benchmarks/detection_head.py [--repeats 3] [--small]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record  # noqa: E402
from bbu_jax.losses import LossWeights, MatchCost, matcher  # noqa: E402
from bbu_jax.losses.multitask import HEAD_INPUTS, multitask_loss  # noqa: E402
from bbu_jax.models.detection_head import DetectionHead  # noqa: E402

SIZES = dict(D=2048, W=256, layers=6, heads=8, mlp=1024, caption_layers=2, Q=100, B=1, L=8192, S=8,
             NV=512, NT=64, M=64, C=24, K=1024, V=151936)
SMALL = dict(SIZES, D=256, L=2048, NV=128, NT=16, M=16, C=8, K=128, V=4096)  # smoke run
WEIGHTS = LossWeights(lm=0.0, bbox_l1=5.0, bbox_giou=2.0, objectness=2.0, caption=1.0,
                      match=MatchCost(class_weight=2.0, bbox_weight=5.0, giou_weight=2.0,
                                      focal_alpha=0.25, focal_gamma=2.0))


def make_inputs(z, seed=0):
    rng = np.random.default_rng(seed)
    b, s, m, c = z["B"], z["S"], z["M"], z["C"]
    vocab = np.sort(rng.choice(z["V"], z["K"], replace=False)).astype(np.int32)
    idx = rng.permutation(z["L"])[: s * (z["NV"] + z["NT"])].reshape(1, s, -1).repeat(b, 0).astype(np.int32)
    lengths = rng.integers(4, c, (b, s, m, 1))
    batch = {
        "targets": np.zeros((b, z["L"]), np.int32), "target_kind": np.zeros((b, z["L"]), np.int8),
        "det_vision_index": idx[..., : z["NV"]], "det_vision_mask": np.ones((b, s, z["NV"]), bool),
        "det_vision_pos": rng.random((b, s, z["NV"], 2)).astype(np.float32),
        "det_text_index": idx[..., z["NV"]:], "det_text_mask": np.ones((b, s, z["NT"]), bool),
        "gt_boxes": np.concatenate([0.2 + 0.6 * rng.random((b, s, m, 2)), 0.02 + 0.2 * rng.random((b, s, m, 2))],
                                   -1).astype(np.float32),
        "gt_valid": np.ones((b, s, m), bool),
        "gt_caption_ids": vocab[rng.integers(0, z["K"], (b, s, m, c))],
        "gt_caption_mask": np.arange(c) <= lengths,
        "segment_valid": np.ones((b, s), bool),
    }
    hidden = jnp.asarray(rng.normal(size=(b, z["L"], z["D"])), jnp.float32)
    table = jnp.asarray(rng.normal(size=(z["V"], z["D"])) * 0.02, jnp.float32)
    return batch, hidden, table, jnp.asarray(vocab)


def make_step(z, method):
    @nnx.jit
    def step(head, hidden, table, batch, vocab):
        def loss(head, hidden):
            return multitask_loss(hidden, table[:8], batch, WEIGHTS, head=head, embed_table=table,
                                  caption_vocab=vocab, detection=True, lm_chunk=512, matcher=method)
        (total, metrics), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(head, hidden)
        return total, grads
    return step


def timed(fn, repeats):
    fn()  # compile + warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="reduced sizes, for a quick check")
    args = parser.parse_args()
    z = SMALL if args.small else SIZES
    head = DetectionHead(llm_hidden=z["D"], width=z["W"], num_queries=z["Q"], num_layers=z["layers"],
                         num_heads=z["heads"], mlp_dim=z["mlp"], caption_layers=z["caption_layers"],
                         max_caption_len=z["C"], rngs=nnx.Rngs(0))
    batch, hidden, table, vocab = make_inputs(z)

    host_seconds = []
    original = matcher._scipy_match_host

    def timed_host(*a):
        t = time.perf_counter()
        out = original(*a)
        host_seconds.append(time.perf_counter() - t)
        return out

    matcher._scipy_match_host = timed_host  # traced into the step below: times every host call
    forward = nnx.jit(lambda head, hidden, batch: head(hidden, *(batch[k] for k in HEAD_INPUTS)))
    fwd_ms = timed(lambda: forward(head, hidden, batch), args.repeats)
    step_scipy = make_step(z, "scipy")
    scipy_ms = timed(lambda: step_scipy(head, hidden, table, batch, vocab), args.repeats)
    host_ms = statistics.median(host_seconds[1:]) * 1e3  # the first call belongs to the warm-up
    matcher._scipy_match_host = original
    step_optax = make_step(z, "optax")
    optax_ms = timed(lambda: step_optax(head, hidden, table, batch, vocab), args.repeats)

    share = 100 * host_ms / scipy_ms
    problems = z["layers"] * z["B"] * z["S"]
    print("sizes: " + ", ".join(f"{k}={v}" for k, v in z.items()))
    print(f"{'what':58s} {'ms':>10s}")
    for name, ms in [("head forward only", fwd_ms),
                     ("head + losses fwd+bwd, scipy matcher (host callback)", scipy_ms),
                     (f"  of which scipy host call ({problems} problems {z['Q']}x{z['M']})", host_ms),
                     ("head + losses fwd+bwd, optax matcher (on device)", optax_ms)]:
        print(f"{name:58s} {ms:10.1f}")
    headline = f"detection_head: fwd+bwd = {scipy_ms:.0f} ms (matcher share {share:.1f}%)"
    record("detection_head", headline, sizes=z, small=args.small, repeats=args.repeats,
           ms={"forward": round(fwd_ms, 1), "fwd_bwd_scipy": round(scipy_ms, 1),
               "scipy_host_call": round(host_ms, 2), "fwd_bwd_optax": round(optax_ms, 1)},
           matcher_share_percent=round(share, 2))


if __name__ == "__main__":
    main()
