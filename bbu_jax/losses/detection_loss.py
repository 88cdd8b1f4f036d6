"""DETR set loss: Hungarian matching per decoder layer, focal objectness, L1 + GIoU, captions.

Every term is returned as a SUM with the count that normalizes it, so means over gradient
accumulation steps, devices and logging intervals can be formed exactly (sum of sums / sum of
counts). Box and objectness terms are normalized by the number of valid GT boxes (DETR), caption
cross-entropy by the number of supervised caption tokens. Under ``jax.jit`` with sharded inputs a
``jnp.sum`` over the batch is already the global (all-device) sum.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from bbu_jax.losses import box_ops
from bbu_jax.losses.matcher import hungarian_match
from bbu_jax.models.detection_head import DetectionHead, caption_vocab_index


@dataclasses.dataclass(frozen=True)
class MatchCost:
    """Matching cost weights (Deformable-DETR/DINO: 2 focal, 5 L1, 2 GIoU) and focal parameters."""
    class_weight: float
    bbox_weight: float
    giou_weight: float
    focal_alpha: float
    focal_gamma: float


def focal_class_cost(logits: Float[Array, "*b q"], alpha: float, gamma: float) -> Float[Array, "*b q"]:
    """Cost of calling a query an object (positive minus negative focal term), log-space stable."""
    p = jax.nn.sigmoid(logits)
    pos = alpha * (1 - p) ** gamma * jax.nn.softplus(-logits)  # -log p
    neg = (1 - alpha) * p ** gamma * jax.nn.softplus(logits)  # -log(1 - p)
    return pos - neg


def match_cost(boxes: Float[Array, "n q 4"], logits: Float[Array, "n q"],
               gt_boxes: Float[Array, "n m 4"], cost: MatchCost) -> Float[Array, "n q m"]:
    """2·focal + 5·L1(cxcywh) + 2·(-GIoU) for every (query, GT) pair; no gradient."""
    boxes, logits = jax.lax.stop_gradient(boxes), jax.lax.stop_gradient(logits)
    cls = focal_class_cost(logits, cost.focal_alpha, cost.focal_gamma)[..., None]
    l1 = jnp.abs(boxes[..., :, None, :] - gt_boxes[..., None, :, :]).sum(-1)
    giou = jax.vmap(box_ops.generalized_box_iou)(box_ops.box_cxcywh_to_xyxy(boxes),
                                                  box_ops.box_cxcywh_to_xyxy(gt_boxes))
    return cost.class_weight * cls + cost.bbox_weight * l1 - cost.giou_weight * giou


def set_loss_sums(boxes: Float[Array, "nl b s q 4"], logits: Float[Array, "nl b s q"],
                  gt_boxes: Float[Array, "b s m 4"], gt_valid: Bool[Array, "b s m"],
                  segment_valid: Bool[Array, "b s"], cost: MatchCost, *, matcher: str
                  ) -> tuple[dict[str, Array], Int[Array, "b s m"]]:
    """Per-layer box/objectness sums (each (NL,)), the box count, the matched-IoU sum of the last
    layer, and the last layer's match (B, S, M) (query index per GT, -1 if none).

    Matching is done independently for every layer (DETR aux loss) in one matcher call.
    Objectness is summed over all queries of real segments; padding segments add nothing.
    """
    nl, b, s, q = logits.shape
    m = gt_boxes.shape[2]
    valid = gt_valid.astype(bool) & segment_valid.astype(bool)[..., None]
    p_boxes = boxes.reshape(nl * b * s, q, 4)
    p_logits = logits.reshape(nl * b * s, q)
    g_boxes = jnp.broadcast_to(gt_boxes, (nl, b, s, m, 4)).reshape(nl * b * s, m, 4)
    g_valid = jnp.broadcast_to(valid, (nl, b, s, m)).reshape(nl * b * s, m)
    match = hungarian_match(match_cost(p_boxes, p_logits, g_boxes, cost), g_valid, method=matcher)
    matched = match >= 0
    take = jnp.take_along_axis(p_boxes, jnp.maximum(match, 0)[..., None], axis=1)  # (N, M, 4)
    l1 = jnp.abs(take - g_boxes).sum(-1)
    giou = box_ops.elementwise_generalized_box_iou(box_ops.box_cxcywh_to_xyxy(take),
                                                  box_ops.box_cxcywh_to_xyxy(g_boxes))
    iou = box_ops.elementwise_box_iou(box_ops.box_cxcywh_to_xyxy(take),
                                      box_ops.box_cxcywh_to_xyxy(g_boxes))
    rows = jnp.arange(nl * b * s)[:, None]
    target = jnp.zeros((nl * b * s, q), jnp.float32).at[rows, jnp.maximum(match, 0)].max(
        matched.astype(jnp.float32))
    focal = optax.sigmoid_focal_loss(p_logits, target, alpha=cost.focal_alpha, gamma=cost.focal_gamma)
    real = jnp.broadcast_to(segment_valid.astype(bool), (nl, b, s)).reshape(nl * b * s, 1)
    per_layer = lambda x: x.reshape(nl, -1).sum(-1)
    sums = {
        "bbox_l1": per_layer(jnp.where(matched, l1, 0.0)),
        "bbox_giou": per_layer(jnp.where(matched, 1.0 - giou, 0.0)),
        "objectness": per_layer(jnp.where(real, focal, 0.0)),
        "matched_iou": per_layer(jnp.where(matched, iou, 0.0))[-1],
        "boxes": valid.sum().astype(jnp.float32),
    }
    return sums, match.reshape(nl, b, s, m)[-1]


def caption_loss_sums(head: DetectionHead, queries: Float[Array, "b s q w"], match: Int[Array, "b s m"],
                      gt_caption_ids: Int[Array, "b s m c"], gt_caption_mask: Bool[Array, "b s m c"],
                      embed_table: Float[Array, "v d"], caption_vocab: Int[Array, " k"]
                      ) -> dict[str, Array]:
    """Teacher-forced caption cross-entropy of the matched queries (final layer).

    Returns sums of: cross-entropy, supervised tokens, correct argmax tokens, out-of-vocabulary
    supervised tokens (dropped from the loss; ``check_caption_ids`` catches them on the host).
    """
    matched = match >= 0
    prefix = jnp.take_along_axis(queries, jnp.maximum(match, 0)[..., None], axis=2)  # (B,S,M,W)
    index, in_vocab = caption_vocab_index(gt_caption_ids, caption_vocab)
    scores = head.caption_logits(prefix, index, embed_table, caption_vocab)  # (B,S,M,C,K) f32
    ce = optax.softmax_cross_entropy_with_integer_labels(scores, index)
    supervised = gt_caption_mask.astype(bool) & matched[..., None]
    use = supervised & in_vocab
    correct = jnp.argmax(scores, axis=-1) == index
    return {
        "caption": jnp.where(use, ce, 0.0).sum(),
        "caption_tokens": use.sum().astype(jnp.float32),
        "caption_correct": (use & correct).sum().astype(jnp.float32),
        "caption_oov": (supervised & ~in_vocab).sum().astype(jnp.float32),
    }
