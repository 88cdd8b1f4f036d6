"""Forward+backward time of the detection head + its losses at the 3B run's sizes, and the matcher's share.

Sizes: the head (width, layers, heads, MLP, queries, caption layers), the batch budgets (tokens per
row, samples per row, vision / text memory tokens per sample, objects per sample, caption tokens)
and the loss weights of configs/base.py; the LLM width and vocabulary of Qwen2.5-VL-3B
(``Qwen25VLConfig()``); one row, every object valid, a caption vocabulary of ``--caption_vocab``
ids. Gradients w.r.t. the head parameters and the hidden states (the embedding table's gradient is
a K-row scatter into the LLM's own table gradient, not timed here). The LM loss is not part of this
measurement.

Rows: the jitted step with the scipy matcher (host callback), the scipy matcher alone on the same
problems (``hungarian_match`` of ``match_cost`` on the head's boxes, every decoder layer, jitted:
callback and transfers included), and the step with the on-device optax matcher. Run:
    python benchmarks/detection_head.py [--repeats 3] [--small]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record, run_specs  # noqa: E402
from bbu_jax.data.batch import HEAD_INPUTS  # noqa: E402
from bbu_jax.losses import MatchCost, hungarian_match, multitask_loss  # noqa: E402
from bbu_jax.losses.detection_loss import match_cost  # noqa: E402
from bbu_jax.models.detection_head import DetectionHead, HeadSpec  # noqa: E402
from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig  # noqa: E402


def sizes(run, small: bool, caption_vocab: int) -> dict[str, int]:
    """The run's sizes; ``small``: narrower LLM, shorter rows and memories, for a quick check."""
    llm, h, d = Qwen25VLConfig().text, run.head, run.data
    z = dict(D=llm.hidden_size, W=h.width, layers=h.num_layers, heads=h.num_heads, mlp=h.mlp_dim,
             caption_layers=h.caption_layers, Q=h.num_queries, B=1, L=d.token_budget, S=d.segments_per_row,
             NV=d.vision_memory_tokens, NT=d.text_memory_tokens, M=d.max_objects, C=d.caption_tokens,
             K=caption_vocab, V=llm.vocab_size)
    if small:
        z.update(D=256, L=2048, NV=128, NT=16, M=16, C=8, K=min(caption_vocab, 128), V=4096)
    return z


def make_inputs(z, seed=0):
    rng = np.random.default_rng(seed)
    b, s, m, c = z["B"], z["S"], z["M"], z["C"]
    vocab = np.sort(rng.choice(z["V"], z["K"], replace=False)).astype(np.int32)
    # memory rows may repeat (the budgets can exceed a row): the head's work depends on the sizes only
    idx = rng.integers(0, z["L"], (b, s, z["NV"] + z["NT"])).astype(np.int32)
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


def make_step(loss_spec, method):
    spec = dataclasses.replace(loss_spec, matcher=method)

    @nnx.jit
    def step(head, hidden, table, batch, vocab):
        def loss(head, hidden):
            return multitask_loss(hidden, table[:8], batch, spec, head=head, embed_table=table,
                                  caption_vocab=vocab, detection=True)
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


def matcher_alone(cost: MatchCost):
    """The step's matching on its own: every decoder layer's (Q, M) problems of the head's boxes."""
    @jax.jit
    def match(out, batch):
        nl, b, s, q = out["logits"].shape
        m = batch["gt_boxes"].shape[2]
        gt = jnp.broadcast_to(batch["gt_boxes"], (nl, b, s, m, 4)).reshape(-1, m, 4)
        valid = jnp.broadcast_to(batch["gt_valid"], (nl, b, s, m)).reshape(-1, m)
        costs = match_cost(out["boxes"].reshape(-1, q, 4), out["logits"].reshape(-1, q), gt, cost)
        return hungarian_match(costs, valid, method="scipy")
    return match


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="reduced sizes, for a quick check")
    parser.add_argument("--caption_vocab", type=int, default=1024, help="ids the captions use (K)")
    parser.add_argument("--no-record", dest="record", action="store_false")
    args = parser.parse_args()
    run = run_specs()
    z = sizes(run, args.small, args.caption_vocab)
    # the language loss is not measured here
    loss_spec = dataclasses.replace(run.loss, weights=dataclasses.replace(run.loss.weights, lm=0.0))
    spec = HeadSpec(width=z["W"], num_queries=z["Q"], num_layers=z["layers"], num_heads=z["heads"],
                    mlp_dim=z["mlp"], caption_layers=z["caption_layers"], max_caption_len=z["C"])
    head = DetectionHead(spec, llm_hidden=z["D"], rngs=nnx.Rngs(0))
    batch, hidden, table, vocab = make_inputs(z)

    forward = nnx.jit(lambda head, hidden, batch: head(hidden, *(batch[k] for k in HEAD_INPUTS)))
    fwd_ms = timed(lambda: forward(head, hidden, batch), args.repeats)
    step_scipy = make_step(loss_spec, "scipy")
    scipy_ms = timed(lambda: step_scipy(head, hidden, table, batch, vocab), args.repeats)
    out, match = forward(head, hidden, batch), matcher_alone(loss_spec.weights.match)
    match_ms = timed(lambda: match(out, batch), args.repeats)
    step_optax = make_step(loss_spec, "optax")
    optax_ms = timed(lambda: step_optax(head, hidden, table, batch, vocab), args.repeats)

    share = 100 * match_ms / scipy_ms
    problems = z["layers"] * z["B"] * z["S"]
    print("sizes: " + ", ".join(f"{k}={v}" for k, v in z.items()))
    print(f"{'what':58s} {'ms':>10s}")
    for name, ms in [("head forward only", fwd_ms),
                     ("head + losses fwd+bwd, scipy matcher (host callback)", scipy_ms),
                     (f"  scipy matcher alone ({problems} problems {z['Q']}x{z['M']})", match_ms),
                     ("head + losses fwd+bwd, optax matcher (on device)", optax_ms)]:
        print(f"{name:58s} {ms:10.1f}")
    headline = f"detection_head: fwd+bwd = {scipy_ms:.0f} ms (matcher share {share:.1f}%)"
    if not args.record:
        print(headline)
        return
    record("detection_head", headline, sizes=z, small=args.small, repeats=args.repeats,
           ms={"forward": round(fwd_ms, 1), "fwd_bwd_scipy": round(scipy_ms, 1),
               "scipy_matcher_alone": round(match_ms, 2), "fwd_bwd_optax": round(optax_ms, 1)},
           matcher_share_percent=round(share, 2))


if __name__ == "__main__":
    main()
