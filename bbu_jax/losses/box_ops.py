"""Box conversions and (generalized) IoU, safe on degenerate boxes.

Every division carries an eps so zero-area, zero-width or identical point boxes give finite values
and finite gradients (scenic box_utils does the same); the pairwise forms are the elementwise
forms broadcast, so there is a single implementation of each formula.
"""
from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: Float[ArrayLike, "*b 4"]) -> Float[Array, "*b 4"]:
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes: Float[ArrayLike, "*b 4"]) -> Float[Array, "*b 4"]:
    x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1], axis=-1)


def box_area(boxes_xyxy: Float[ArrayLike, "*b 4"]) -> Float[Array, "*b"]:
    """Area, zero (never negative) for inverted boxes."""
    wh = jnp.maximum(boxes_xyxy[..., 2:] - boxes_xyxy[..., :2], 0.0)
    return wh[..., 0] * wh[..., 1]


def _iou_union_enclosing(a, b):
    """Elementwise (broadcasting) intersection-over-union, union and enclosing-box area."""
    area_a, area_b = box_area(a), box_area(b)
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / (union + EPS)
    enc_wh = jnp.maximum(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0.0)
    enclosing = enc_wh[..., 0] * enc_wh[..., 1]
    return iou, union, enclosing


def elementwise_box_iou(a_xyxy: Float[ArrayLike, "*#b 4"], b_xyxy: Float[ArrayLike, "*#b 4"]
                        ) -> Float[Array, "*#b"]:
    return _iou_union_enclosing(a_xyxy, b_xyxy)[0]


def elementwise_generalized_box_iou(a_xyxy: Float[ArrayLike, "*#b 4"], b_xyxy: Float[ArrayLike, "*#b 4"]
                                    ) -> Float[Array, "*#b"]:
    """GIoU = IoU - (enclosing - union) / enclosing, in [-1, 1]; 0 for two identical points."""
    iou, union, enclosing = _iou_union_enclosing(a_xyxy, b_xyxy)
    return iou - (enclosing - union) / (enclosing + EPS)


def box_iou(a_xyxy: Float[ArrayLike, "n 4"], b_xyxy: Float[ArrayLike, "m 4"]) -> Float[Array, "n m"]:
    return elementwise_box_iou(a_xyxy[:, None, :], b_xyxy[None, :, :])


def generalized_box_iou(a_xyxy: Float[ArrayLike, "n 4"], b_xyxy: Float[ArrayLike, "m 4"]) -> Float[Array, "n m"]:
    return elementwise_generalized_box_iou(a_xyxy[:, None, :], b_xyxy[None, :, :])
