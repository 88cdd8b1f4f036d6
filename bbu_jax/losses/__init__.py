"""Losses: box ops, Hungarian matcher, DETR set loss, fused chunked LM loss, the multi-task total."""
from bbu_jax.losses.box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou
from bbu_jax.losses.detection_loss import MatchCost
from bbu_jax.losses.lm_loss import lm_loss
from bbu_jax.losses.matcher import hungarian_match
from bbu_jax.losses.multitask import LossSpec, LossWeights, loss_normalizers, metric_means, multitask_loss

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_iou", "generalized_box_iou", "MatchCost",
           "lm_loss", "hungarian_match", "LossSpec", "LossWeights", "loss_normalizers", "metric_means",
           "multitask_loss"]
