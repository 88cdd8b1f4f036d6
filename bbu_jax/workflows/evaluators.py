"""Evaluation during a run: every loss term and the head's COCO metrics in one jitted pass over
the val set, whose batches are encoded once per run; generated answers for val records, scored as
inference would score them; plus a picture grid of ground truth vs predictions for TensorBoard."""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.pipeline import make_eval_batches
from bbu_jax.data.schema import load_records
from bbu_jax.evaluation.evaluator import evaluate
from bbu_jax.evaluation.metrics import generate_metrics
from bbu_jax.inference.answers import answer_prompts, build_prompts, truth
from bbu_jax.evaluation.visualize import comparison_grid
from bbu_jax.workflows.config import Specs

log = logging.getLogger(__name__)

Evaluator = Callable[[Mapping[str, nnx.Module], int], dict[str, Any]]


def val_evaluator(specs: Specs, encoder: SampleEncoder, caption_vocab: np.ndarray | None, *, num_teachers: int,
                  num_pictures: int = 4, draw_min_score: float = 0.3, generate_batch: int = 8) -> Evaluator:
    """evaluator(modules, step) -> val metrics ({name: value}; a (N, H, W, 3) uint8 value is a
    picture grid). Reads and encodes the first eval.num_batches val batches (0: all) now, once;
    likewise the prompts of the first eval.generate_samples val records (-1: all), which every
    evaluation answers by generation as inference would (``num_teachers`` demonstrations from the
    teacher pool) for the ``generate/*`` metrics."""
    data = specs.data
    records, _ = load_records(data.val_jsonl, skip_bad_samples=data.skip_bad_samples)
    n = len(records) if specs.eval.generate_samples < 0 else specs.eval.generate_samples
    pool = [r.student for r in load_records(data.teacher_pool_jsonl, skip_bad_samples=data.skip_bad_samples)[0]
            ] if data.teacher_pool_jsonl else []
    prompts, _ = build_prompts(encoder, records[:n], pool, num_teachers=num_teachers,
                               skip_bad_samples=data.skip_bad_samples)
    batches = []
    for batch in make_eval_batches(data.val_jsonl, encoder, data.budgets(rows=data.batch_rows, segments=1),
                                   skip_bad_samples=data.skip_bad_samples):
        if specs.eval.num_batches and len(batches) >= specs.eval.num_batches:
            break
        batches.append(batch)
    log.info("val: %d batches of %s encoded once for every evaluation", len(batches), data.val_jsonl)
    top_k = 0 if specs.head is None else min(100, specs.head.num_queries)

    def evaluator(modules, step):
        del step
        report, preds = evaluate(modules["model"], modules.get("head"), batches, records, encoder.tokenizer,
                                 caption_vocab=caption_vocab, loss=specs.loss, top_k=top_k, prefix="")
        if prompts:
            answers = answer_prompts(modules["model"], encoder.tokenizer, [p for _, p in prompts],
                                     max_new_tokens=specs.eval.generate_max_new_tokens, batch_size=generate_batch,
                                     progress=False)
            report.update(generate_metrics([truth(r) for r, _ in prompts], [pred for _, pred, _ in answers],
                                           [status for _, _, status in answers]))
        if specs.head is not None:
            shown = [(p["image"], p["gt"], [o for o in p["pred"] if o["score"] >= draw_min_score])
                     for p in preds[:num_pictures]]
            report["predictions"] = comparison_grid(shown, panel_size=256)[None]
        return report

    return evaluator
