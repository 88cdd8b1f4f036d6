"""Evaluate a trained model on a JSONL file: the detection head, generated answers, or both.

  python scripts/evaluate.py --checkpoint RUN_OR_HF_DIR --data val.jsonl --output REPORT.json \
      [--mode head|generate|both] [--teacher_pool P --num_teachers N] [--language zh|en] \
      [--min_pixels N --max_pixels N] [--config CONFIG] [--batch_size 8] [--max_new_tokens 1024] \
      [--predictions_dir DIR]

--checkpoint is an HF export folder (config.json, safetensors, tokenizer, and for head mode
detection_head.safetensors + detection_head_config.json), or a training run's workdir (its
hf_export/ is used). Use the pixel limits the model was trained with: language and pixel limits
default to --config's data group (the config the model was trained with), and so do the loss
weights that shape the reported val loss total.

Report keys: head mode `head/AP`, `head/AP50`, `head/AR100`, per-type `head/AP50/<type>` ...,
`head/caption_accuracy`, and every val loss component (`lm_loss`, `bbox_l1_loss`, ...);
generate mode `generate/precision`, `generate/recall`, `generate/f1`, `caption_accuracy`,
`parse_failures`, ... A mode that was not run leaves its keys out; a metric with nothing to
measure is null. --predictions_dir writes head_predictions.jsonl / generate_predictions.jsonl
in the format scripts/visualize.py draws.

Before any work the outputs' folders are created and checked to be writable, and a detection
head is checked against the model beside it (one trained on another model is refused). Exit
status: 0 done, 1 a bad path, model folder, head or record (one line).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from bbu_jax.data.chat import LANGUAGES

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.py"


def resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "hf_export" / "config.json").is_file():
        return p / "hf_export"
    raise FileNotFoundError(f"{p}: neither an HF folder (config.json) nor a run workdir with hf_export/")


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="JSONL to evaluate on (e.g. val.jsonl)")
    p.add_argument("--output", required=True, help="report JSON (written atomically)")
    p.add_argument("--mode", choices=["head", "generate", "both"], default="both")
    p.add_argument("--teacher_pool", default=None)
    p.add_argument("--num_teachers", type=int, default=0)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the training config (defaults below)")
    p.add_argument("--language", choices=LANGUAGES, default=None, help="default: the config's data.language")
    p.add_argument("--min_pixels", type=int, default=None, help="default: the config's data.min_pixels")
    p.add_argument("--max_pixels", type=int, default=None, help="default: the config's data.max_pixels")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--top_k", type=int, default=100, help="head detections kept per image (COCO counts 100)")
    p.add_argument("--predictions_dir", default=None)
    p.add_argument("--skip_bad_samples", action="store_true")
    args = p.parse_args(argv)

    from bbu_jax.data.encode import SampleEncoder
    from bbu_jax.data.pipeline import make_eval_batches
    from bbu_jax.data.schema import load_records
    from bbu_jax.evaluation.evaluator import evaluate, json_safe
    from bbu_jax.evaluation.metrics import generate_metrics
    from bbu_jax.foundation.files import check_writable, write_json_atomic, write_jsonl_atomic
    from bbu_jax.inference.answers import generate_answers
    from bbu_jax.workflows.config import build_specs, load_config
    from bbu_jax.models.qwen2_5_vl import from_hf
    from bbu_jax.models.detection_head_files import check_detection_head, load_detection_head

    names = {"head": ["head_predictions.jsonl"], "generate": ["generate_predictions.jsonl"]}
    names["both"] = names["head"] + names["generate"]
    try:  # everything that can be checked before the long part: a bad path, file or head fails now
        out = check_writable(args.output)
        out_dir = Path(args.predictions_dir).absolute() if args.predictions_dir else None
        for name in names[args.mode] if out_dir else ():
            check_writable(out_dir / name)
        specs = build_specs(load_config(args.config))
        for key in ("language", "min_pixels", "max_pixels"):
            if getattr(args, key) is None:
                setattr(args, key, getattr(specs.data, key))
        ckpt = resolve_checkpoint(args.checkpoint)
        records, errors = load_records(args.data, skip_bad_samples=args.skip_bad_samples)
        if not records:
            raise ValueError(f"{args.data}: no usable records")
        pool = []
        if args.teacher_pool:
            pool_records, pool_errors = load_records(args.teacher_pool, skip_bad_samples=args.skip_bad_samples)
            pool, errors = [r.student for r in pool_records], errors + pool_errors
        encoder = SampleEncoder(str(ckpt), min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                language=args.language)
        head = caption_vocab = None
        if args.mode in ("head", "both"):
            head, caption_vocab = load_detection_head(ckpt)
            check_detection_head(ckpt)  # a head beside another model than its own is refused
        model = from_hf(ckpt)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report: dict[str, float] = {}
    t0 = time.perf_counter()
    if head is not None:
        budgets = fit_budgets(encoder, records, pool, args.num_teachers, args.batch_size)
        batches = make_eval_batches(args.data, encoder, budgets, teacher_pool=args.teacher_pool,
                                    teacher_ratio=float(args.num_teachers > 0), max_teachers=args.num_teachers,
                                    skip_bad_samples=args.skip_bad_samples)
        head_report, head_preds = evaluate(model, head, batches, records, encoder.tokenizer,
                                           caption_vocab=caption_vocab, loss=specs.loss, top_k=args.top_k,
                                           prefix="")
        report.update(head_report)
        if out_dir:
            write_jsonl_atomic(out_dir / "head_predictions.jsonl", [
                {"id": r["id"], "images": [os.path.relpath(r["image"], out_dir)], "gt": r["gt"], "pred": r["pred"]}
                for r in head_preds])
    if args.mode in ("generate", "both"):
        answers, bad = generate_answers(model, encoder, records, pool, num_teachers=args.num_teachers,
                                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                        skip_bad_samples=args.skip_bad_samples)
        errors += bad
        report.update(generate_metrics([a.gt for a in answers], [a.pred for a in answers],
                                       [a.status for a in answers]))
        if out_dir:
            write_jsonl_atomic(out_dir / "generate_predictions.jsonl", [
                {"id": a.record.id, "images": [os.path.relpath(x, out_dir) for x in a.record.student.images],
                 "gt": a.gt, "pred": a.pred, "response": a.response, "parse_status": a.status.to_dict()}
                for a in answers])
    report["num_records"] = float(len(records))
    report["skipped_records"] = float(len(errors))
    write_json_atomic(out, json_safe(report), indent=2, sort_keys=True)

    headline = [k for k in ("head/AP", "head/AP50", "head/AR100", "head/caption_accuracy", "lm_loss",
                            "generate/precision", "generate/recall", "generate/f1", "caption_accuracy",
                            "parse_failures") if k in report]
    print(f"{'metric':<26}{'value':>10}")
    for k in headline:
        v = report[k]
        print(f"{k:<26}{'n/a' if math.isnan(v) else f'{v:.4f}':>10}")
    print(f"{len(records)} records ({len(errors)} skipped) in {time.perf_counter() - t0:.1f}s -> {out}")
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
