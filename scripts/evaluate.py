"""Evaluate a trained model on a JSONL file: the detection head, generated answers, or both.

  python scripts/evaluate.py --model MODEL --data val.jsonl --output REPORT_DIR [--mode head|generate|both]

--model is an HF export of a training run, a run folder (its newest readable checkpoint) or one
checkpoint step (RUN/checkpoints/STEP). Every setting defaults to what the model was trained with
(recorded beside its weights): language and prompt, pixel limits, demonstrations and their pool,
and the loss weights that make up the reported val loss total. A flag overrides it; one that
contradicts the trained value prints a warning naming both.

--output is a folder: report.json (every metric) and the predictions in the format
scripts/visualize.py draws (head_predictions.jsonl, generate_predictions.jsonl). Report keys: head
mode `head/box_AP`, `head/box_AP50`, `head/box_AR100` (class-agnostic), `head/type_mAP`,
`head/type_mAP50` (mean over desc types), per type `head/AP50/<type>` ..., `head/caption_accuracy`,
and every val loss term (`lm_loss`, `bbox_l1_loss`, ...); generate mode `generate/precision`,
`generate/recall`, `generate/f1` (IoU >= 0.5 and the full desc equal), `generate/complete_json`,
`generate/parse_failures`, ... A mode that was not run leaves its keys out; a metric with nothing
to measure is null.

Before any work the output files are checked to be writable (existing ones are replaced only with
--overwrite), and a detection head is checked against the model beside it (one trained on another
model is refused). Exit status: 0 done, 1 a bad path, model folder, head or record (one line).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time

from bbu_jax.workflows.cli import HelpFormatter, add_model_flags, load_predictor

REPORT = "report.json"
PREDICTIONS = {"head": "head_predictions.jsonl", "generate": "generate_predictions.jsonl"}


def fit_budgets(encoder, records, pool, num_teachers: int, rows: int):
    """Budgets that hold every record with its largest possible demonstrations (rounded up so
    the evaluation compiles once)."""
    from bbu_jax.data.collate import Budgets

    def up(n: int, m: int) -> int:
        return max(m, -(-n // m) * m)

    students = [encoder.encode(r.student, r.teachers or (), source=r.source, record_id=r.id) for r in records]
    extra_tokens = extra_patches = 0
    if num_teachers and pool:
        demos = [encoder.encode(p, (), source="<pool>", record_id="<pool>") for p in pool]
        extra_tokens = sum(sorted(d.num_tokens for d in demos)[-num_teachers:])
        extra_patches = sum(sorted(d.num_patches for d in demos)[-num_teachers:])
    return Budgets(
        rows=rows, segments=1,
        tokens=up(max(s.num_tokens for s in students) + extra_tokens, 64),
        patches=up(max(s.num_patches for s in students) + extra_patches, 256),
        objects=up(max(len(s.gt_caption_ids) for s in students), 8),
        caption_tokens=max(max((len(c) for s in students for c in s.gt_caption_ids), default=1), 1),
        vision_memory=up(max(len(s.det_vision_index) for s in students), 64),
        text_memory=up(max(len(s.det_text_index) for s in students), 16))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_flags(p)
    p.add_argument("--output", required=True, help=f"report folder ({REPORT} and predictions, written atomically)")
    p.add_argument("--mode", choices=["head", "generate", "both"], default="both")
    p.add_argument("--top_k", type=int, default=100, help="head detections kept per image (COCO counts 100)")
    args = p.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max_samples must be >= 1")
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING, force=True)

    from pathlib import Path

    from bbu_jax.data.pipeline import make_eval_batches
    from bbu_jax.data.schema import load_records
    from bbu_jax.evaluation.evaluator import evaluate, json_safe
    from bbu_jax.evaluation.metrics import generate_metrics
    from bbu_jax.foundation.files import check_new_output, write_json_atomic, write_jsonl_atomic
    from bbu_jax.inference.answers import generate_answers, prediction_row

    modes = ["head", "generate"] if args.mode == "both" else [args.mode]
    try:  # everything that can be checked before the long part: a bad path, file or head fails now
        out_dir = Path(args.output).absolute()
        if out_dir.is_file():
            raise NotADirectoryError(f"{out_dir} is a file; --output names a folder")
        report_file = check_new_output(out_dir / REPORT, overwrite=args.overwrite)
        pred_files = {m: check_new_output(out_dir / PREDICTIONS[m], overwrite=args.overwrite) for m in modes}
        records, errors = load_records(args.data, skip_bad_samples=args.skip_bad_samples)
        records = records[:args.max_samples]
        if not records:
            raise ValueError(f"{args.data}: no usable records")
        predictor = load_predictor(args)
        if "head" in modes and predictor.head is None:
            raise ValueError(f"{args.model} has no detection head: use --mode generate")
        pool = predictor.demonstrations(predictor.num_teachers)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    settings, encoder, n_teachers = predictor.trained.settings, predictor.encoder, predictor.num_teachers
    report: dict[str, float] = {}
    t0 = time.perf_counter()
    if "head" in modes:
        budgets = fit_budgets(encoder, records, pool, n_teachers, args.batch_size)
        pool_file = predictor.teacher_pool if n_teachers else None
        batches = make_eval_batches(args.data, encoder, budgets, teacher_pool=pool_file or None,
                                    teacher_ratio=float(n_teachers > 0), max_teachers=n_teachers,
                                    skip_bad_samples=args.skip_bad_samples, max_samples=args.max_samples)
        head_report, head_preds = evaluate(predictor.model, predictor.head, batches, records, encoder.tokenizer,
                                           caption_vocab=predictor.trained.caption_vocab,
                                           loss=None if settings is None else settings.loss_spec(),
                                           top_k=args.top_k, prefix="")
        report.update(head_report)
        write_jsonl_atomic(pred_files["head"], [prediction_row(r["id"], [r["image"]], r["gt"], r["pred"], out_dir)
                                                for r in head_preds])
    if "generate" in modes:
        answers, bad = generate_answers(predictor.model, encoder, records, pool, num_teachers=n_teachers,
                                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                        skip_bad_samples=args.skip_bad_samples)
        errors += bad
        report.update(generate_metrics([a.gt for a in answers], [a.pred for a in answers],
                                       [a.status for a in answers]))
        write_jsonl_atomic(pred_files["generate"], [
            prediction_row(a.record.id, a.record.student.images, a.gt, a.pred, out_dir, response=a.response,
                           status=a.status) for a in answers])
    report["num_records"] = float(len(records))
    report["skipped_records"] = float(len(errors))
    write_json_atomic(report_file, json_safe(report), indent=2, sort_keys=True)

    headline = [k for k in ("head/box_AP", "head/box_AP50", "head/type_mAP50", "head/caption_accuracy", "lm_loss",
                            "generate/precision", "generate/recall", "generate/f1", "generate/complete_json",
                            "generate/parse_failures") if k in report]
    print(f"{'metric':<26}{'value':>10}")
    for k in headline:
        v = report[k]
        print(f"{k:<26}{'n/a' if math.isnan(v) else f'{v:.4f}':>10}")
    print(f"{len(records)} records ({len(errors)} skipped) in {time.perf_counter() - t0:.1f}s -> {out_dir}")
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
