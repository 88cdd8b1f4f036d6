"""Jitted batch evaluation over a whole val file: every loss component and the head's detections.

One jitted step per fixed-shape batch computes the LLM forward once, the multi-task loss as
(sum, count) pairs and the head's top-k detections; sums and counts are added over batches on
the host, so means are exact whatever the padding (padded rows carry no targets and no boxes) and
however the batch is sharded (a sum inside jit over a sharded batch is already global).
"""
from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from bbu_jax.data.batch import HEAD_INPUTS, MODEL_INPUTS
from bbu_jax.data.schema import Record
from bbu_jax.evaluation.metrics import head_metrics
from bbu_jax.inference.answers import truth
from bbu_jax.inference.predict import decode_detections, detect_from_outputs
from bbu_jax.losses import LossSpec, multitask_loss
from bbu_jax.models.detection_head import DetectionHead
from bbu_jax.models.qwen2_5_vl import Qwen25VL
from bbu_jax.foundation import sharding


@nnx.jit(static_argnames=("loss", "top_k"))
def eval_step(model: Qwen25VL, head: DetectionHead | None, batch: dict, caption_vocab, end_token_id, *,
              loss: LossSpec | None, top_k: int):
    """(metrics {name: (sum, count)} (empty without a loss spec), detections or None) for one batch."""
    hidden = model(**{k: batch[k] for k in MODEL_INPUTS})
    outputs = None if head is None else head(hidden, *(batch[k] for k in HEAD_INPUTS))
    metrics = {}
    if loss is not None:
        total, metrics = multitask_loss(hidden, model.lm_head_matrix(), batch, loss, head=head,
                                    embed_table=model.embed_table(), caption_vocab=caption_vocab,
                                    detection=head is not None, head_outputs=outputs,
                                    compute_dtype=model.compute_dtype)
        metrics["loss"] = (total, jnp.ones((), jnp.float32))  # the weighted total, averaged over batches
    if head is None:
        return metrics, None
    return metrics, detect_from_outputs(model, head, outputs, caption_vocab, end_token_id, top_k)


def evaluate(model: Qwen25VL, head: DetectionHead | None, batches: Iterable[tuple[dict, list[list[dict]]]],
             records: Sequence[Record], tokenizer, *, caption_vocab: np.ndarray | None,
             loss: LossSpec | None, top_k: int = 100,
             prefix: str = "val/") -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Val losses (``{prefix}lm_loss`` ...; skipped when ``loss`` is None) and, with a head, its
    COCO metrics (the ``head/*`` keys of ``metrics.head_metrics``) over every batch; plus one
    prediction record per sample ({"source", "id", "image", "gt", "pred"}) for reports and pictures.
    """
    by_source = {r.source: r for r in records}
    end_id = jnp.int32(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    vocab = None if caption_vocab is None else jnp.asarray(caption_vocab, jnp.int32)
    k = 0 if head is None else min(top_k, head.spec.num_queries)
    sums: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, float] = collections.defaultdict(float)
    predictions: list[dict[str, Any]] = []
    mesh = getattr(model.embed_table().sharding, "mesh", None)  # a NamedSharding's, when placed on one
    for batch, metas in batches:
        # under the params' mesh the step splits activations over rows, as the train step does
        with sharding.mesh_context(mesh):
            metrics, dets = eval_step(model, head, batch, vocab, end_id, loss=loss, top_k=k)
        # rows of a batch split over several processes: every process decodes the whole batch
        dets = None if dets is None else multihost_utils.process_allgather(dets, tiled=True)
        for name, (s, c) in metrics.items():
            sums[name] += float(s)
            counts[name] += float(c)
        decoded = {} if dets is None else decode_detections(*dets, metas, tokenizer, score_threshold=0.0)
        for meta in (m for row in metas for m in row):
            record = by_source[meta["source"]]
            gt = truth(record)
            det = decoded.get((meta["row"], meta["segment"]))
            pred = [] if det is None else [
                {"bbox_2d": [round(float(v), 1) for v in box], "desc": cap, "score": float(score)}
                for box, score, cap in zip(det.boxes, det.scores, det.captions)]
            predictions.append({"source": meta["source"], "id": meta["id"], "image": meta["image"],
                                "gt": gt, "pred": pred})
    report = {f"{prefix}{name}": sums[name] / max(counts[name], 1.0) for name in sums}
    report[f"{prefix}num_samples"] = float(len(predictions))
    if not predictions:
        raise ValueError("evaluation saw no samples")
    if head is not None and predictions:
        coco = head_metrics([p["gt"] for p in predictions], [p["pred"] for p in predictions])
        report.update({f"{prefix}{key}": value for key, value in coco.items()})
    return report, predictions


def json_safe(report: Mapping[str, float]) -> dict[str, float | None]:
    """NaN (a metric with nothing to measure) -> null, so the report is valid JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in report.items()}
