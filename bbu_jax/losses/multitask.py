"""The one training loss: language modeling plus (optionally) the detection head's set loss.

``multitask_loss`` returns the weighted total and ``metrics``: {name: (sum, count)} float32
scalars for every component, so exact means over accumulation steps, devices and logging intervals
are sum(sums) / sum(counts) (``metric_means`` does the division for one step).

Normalization. Each component's mean is sum / max(count, 1). Under ``jax.jit`` with a globally
sharded batch, the counts computed here (``jnp.sum`` over the batch) are already global across
devices. With gradient accumulation, pass ``normalizers`` — the counts of the whole accumulated
batch (``loss_normalizers`` on the host batches, summed) — so every micro-step's gradient is
scaled by the same global count and the accumulated gradient equals the full-batch one.

Detection components: ``bbox_l1_loss``, ``bbox_giou_loss``, ``objectness_loss`` are the final
decoder layer; with ``LossSpec.aux_loss``, ``*_aux`` is the sum over the other layers (DETR
auxiliary losses, same weight, each layer matched on its own) and the total uses both; without it
only the final layer is matched and trained on. ``caption_loss`` is on the final layer's matches.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from bbu_jax.losses.detection_loss import MatchCost, caption_loss_sums, set_loss_sums
from bbu_jax.losses.lm_loss import lm_loss
from bbu_jax.models.detection_head import DetectionHead

HEAD_INPUTS = ("det_vision_index", "det_vision_mask", "det_vision_pos", "det_text_index",
               "det_text_mask")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the total; DETR reference values: bbox_l1 5, bbox_giou 2, objectness 2,
    caption 1, matching 2/5/2 with focal alpha 0.25, gamma 2."""
    lm: float
    bbox_l1: float
    bbox_giou: float
    objectness: float
    caption: float
    match: MatchCost


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The loss group of the config: weights, auxiliary decoder-layer losses, LM chunking, matcher."""
    weights: LossWeights
    aux_loss: bool
    lm_chunk: int  # tokens per chunk of the LM loss
    matcher: str  # one of matcher.METHODS (a config's "auto" is resolved by workflows.config.build_specs)


def loss_normalizers(batch: Mapping[str, ArrayLike]) -> dict[str, Array]:
    """Counts that normalize the total: supervised tokens, valid GT boxes, supervised caption
    tokens of valid GT boxes (float32 scalars; jittable, or on host batches). Sum them over
    micro-batches for gradient accumulation. They equal the counts in ``multitask_loss``'s
    metrics whenever every valid GT gets a query (Q >= M) and every caption id is in the caption
    vocabulary (``check_caption_ids``)."""
    valid = jnp.asarray(batch["gt_valid"], bool) & jnp.asarray(batch["segment_valid"], bool)[..., None]
    return {"tokens": jnp.sum(jnp.asarray(batch["target_kind"]) > 0, dtype=jnp.float32),
            "boxes": jnp.sum(valid, dtype=jnp.float32),
            "caption_tokens": jnp.sum(jnp.asarray(batch["gt_caption_mask"], bool) & valid[..., None],
                                      dtype=jnp.float32)}


def metric_means(metrics: Mapping[str, tuple[Array, Array]]) -> dict[str, Array]:
    return {k: s / jnp.maximum(c, 1.0) for k, (s, c) in metrics.items()}


def multitask_loss(hidden: Float[Array, "b l d"], lm_head: Float[Array, "v d"],
                   batch: Mapping[str, Array], spec: LossSpec, *,
                   head: DetectionHead | None = None, embed_table: Float[Array, "v d"] | None = None,
                   caption_vocab: Array | None = None, detection: bool,
                   normalizers: Mapping[str, Array] | None = None,
                   head_outputs: Mapping[str, Array] | None = None, compute_dtype=jnp.float32
                   ) -> tuple[Array, dict[str, tuple[Array, Array]]]:
    """Weighted total loss and {name: (sum, count)} metrics. Jittable; the total is differentiable
    w.r.t. ``hidden``, ``lm_head``, ``embed_table`` and the head's parameters (the LM metrics are
    values: ``lm_loss`` computes its gradient in the forward pass for the total only).

    ``head_outputs``: the result of ``head(hidden, ...)`` when the caller already has it (e.g. an
    evaluation step that also decodes predictions); otherwise the head is run here. The head
    module is needed either way for the caption decoder. ``compute_dtype``: the LM head's matmuls.
    """
    norm = dict(normalizers or {})
    norm.setdefault("tokens", jnp.sum(jnp.asarray(batch["target_kind"]) > 0, dtype=jnp.float32))

    def mean(total, key):
        return total / jnp.maximum(norm[key], 1.0)

    weights = spec.weights
    total, lm_metrics = lm_loss(hidden, lm_head, batch["targets"], batch["target_kind"], chunk=spec.lm_chunk,
                                scale=weights.lm / jnp.maximum(norm["tokens"], 1.0), compute_dtype=compute_dtype)
    metrics = dict(lm_metrics)
    if not detection:
        return total, metrics
    if head is None or embed_table is None or caption_vocab is None:
        raise ValueError("detection=True needs head, embed_table and caption_vocab")

    out = head(hidden, *(batch[k] for k in HEAD_INPUTS)) if head_outputs is None else head_outputs
    layers = slice(None) if spec.aux_loss else slice(-1, None)
    sums, match = set_loss_sums(out["boxes"][layers], out["logits"][layers], batch["gt_boxes"], batch["gt_valid"],
                                batch["segment_valid"], weights.match, matcher=spec.matcher)
    caption = caption_loss_sums(head, out["queries"], match, batch["gt_caption_ids"],
                                batch["gt_caption_mask"], embed_table, caption_vocab)
    boxes, tokens = sums["boxes"], caption["caption_tokens"]
    norm.setdefault("boxes", boxes)
    norm.setdefault("caption_tokens", tokens)
    for name, w in (("bbox_l1", weights.bbox_l1), ("bbox_giou", weights.bbox_giou),
                    ("objectness", weights.objectness)):
        metrics[f"{name}_loss"] = (sums[name][-1], boxes)
        if spec.aux_loss:
            metrics[f"{name}_loss_aux"] = (sums[name][:-1].sum(), boxes)
        total = total + w * mean(sums[name].sum(), "boxes")
    total = total + weights.caption * mean(caption["caption"], "caption_tokens")
    metrics["caption_loss"] = (caption["caption"], tokens)
    metrics["caption_token_accuracy"] = (caption["caption_correct"], tokens)
    metrics["caption_oov_tokens"] = (caption["caption_oov"], jnp.ones((), jnp.float32))
    metrics["matched_iou"] = (sums["matched_iou"], boxes)
    return total, metrics
