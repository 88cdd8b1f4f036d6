"""Shared by the detection tests: one tiny head shape (so eager initializers and jitted steps
compile once per session) and random inputs following bbu_jax.data.batch."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bbu_jax.losses import LossSpec, LossWeights, MatchCost, loss_normalizers, multitask_loss
from bbu_jax.models.detection_head import DetectionHead, HeadSpec

D, V, W, Q, C = 24, 64, 32, 6, 5  # LLM width, LLM vocab, head width, queries, caption tokens
VOCAB = np.array([3, 7, 11, 20, 21, 40, 63], np.int32)  # sorted caption vocab; last plays <|im_end|>
HEAD_FIELDS = ("det_vision_index", "det_vision_mask", "det_vision_pos", "det_text_index", "det_text_mask")

DETR_WEIGHTS = LossWeights(lm=1.0, bbox_l1=5.0, bbox_giou=2.0, objectness=2.0, caption=1.0,
                           match=MatchCost(class_weight=2.0, bbox_weight=5.0, giou_weight=2.0,
                                           focal_alpha=0.25, focal_gamma=2.0))
DETR_LOSS = LossSpec(weights=DETR_WEIGHTS, aux_loss=True, lm_chunk=32, matcher="scipy")


def make_head(seed=0, dtype=jnp.float32):
    spec = HeadSpec(width=W, num_queries=Q, num_layers=2, num_heads=4, mlp_dim=64, caption_layers=1,
                    max_caption_len=C)
    return DetectionHead(spec, llm_hidden=D, dtype=dtype, rngs=nnx.Rngs(seed))


def random_arrays(seed, b=2, l=48):
    """Hidden states (b, l, D) and an embedding table (V, D)."""
    rng = np.random.default_rng(seed + 1000)
    return (jnp.asarray(rng.normal(size=(b, l, D)), jnp.float32),
            jnp.asarray(rng.normal(size=(V, D)), jnp.float32))


def random_batch(seed, *, b=2, l=48, s=2, nv=8, nt=4, m=3, c=C, caption_vocab=VOCAB):
    """Distinct token positions per segment; valid GT first, captions end with the last vocab id."""
    rng = np.random.default_rng(seed)
    k = len(caption_vocab)
    pos = rng.permutation(l)[: s * (nv + nt)].reshape(s, nv + nt)
    batch = {
        "targets": rng.integers(0, V, (b, l)).astype(np.int32),
        "target_kind": rng.integers(0, 3, (b, l)).astype(np.int8),
        "det_vision_index": np.broadcast_to(pos[:, :nv], (b, s, nv)).astype(np.int32).copy(),
        "det_vision_mask": np.ones((b, s, nv), bool),
        "det_vision_pos": rng.random((b, s, nv, 2)).astype(np.float32),
        "det_text_index": np.broadcast_to(pos[:, nv:], (b, s, nt)).astype(np.int32).copy(),
        "det_text_mask": np.ones((b, s, nt), bool),
        "gt_boxes": np.concatenate([0.25 + 0.5 * rng.random((b, s, m, 2)),
                                    0.05 + 0.3 * rng.random((b, s, m, 2))], -1).astype(np.float32),
        "gt_valid": np.arange(m) < rng.integers(1, m + 1, (b, s, 1)),
        "gt_caption_ids": caption_vocab[rng.integers(0, k - 1, (b, s, m, c))].astype(np.int32),
        "gt_caption_mask": np.ones((b, s, m, c), bool),
        "segment_valid": np.ones((b, s), bool),
    }
    lengths = rng.integers(1, c, (b, s, m))  # desc tokens, then the end token, then padding
    steps = np.arange(c)
    batch["gt_caption_ids"] = np.where(steps == lengths[..., None], caption_vocab[-1], batch["gt_caption_ids"])
    batch["gt_caption_mask"] = steps <= lengths[..., None]
    batch["gt_caption_ids"] = np.where(batch["gt_caption_mask"], batch["gt_caption_ids"], 0).astype(np.int32)
    return batch


def loss_and_grads(head, hidden, table, batch, normalizers="host", detection=True, spec=DETR_LOSS):
    """multitask_loss with DETR weights and its gradients w.r.t. (head state, hidden, table).

    ``head`` is a DetectionHead or a (graphdef, state) pair from ``nnx.split`` (cheaper to call
    in a loop). Normalizers default to the host counts of the batch, so most callers share one
    compilation.
    """
    graphdef, state = nnx.split(head) if isinstance(head, DetectionHead) else head
    if normalizers == "host":
        normalizers = {k: jnp.float32(v) for k, v in loss_normalizers(batch).items()}
    return _jitted_loss_and_grads(graphdef, state, hidden, table, batch, normalizers, detection, spec)


@partial(jax.jit, static_argnames=("graphdef", "detection", "spec"))
def _jitted_loss_and_grads(graphdef, state, hidden, table, batch, normalizers, detection, spec):
    def loss(state, hidden, table):
        return multitask_loss(hidden, table, batch, spec, head=nnx.merge(graphdef, state),
                              embed_table=table, caption_vocab=jnp.asarray(VOCAB), detection=detection,
                              normalizers=normalizers)
    (total, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(state, hidden, table)
    return total, metrics, grads
