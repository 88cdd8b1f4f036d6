"""Generate grounding answers for a JSONL file and write them as a predictions file.

  python scripts/infer.py --model_path HF_DIR --input_jsonl val.jsonl --output_file preds.jsonl \
      [--num_teachers 1 --teacher_pool teacher_pool.jsonl] [--max_samples N] [--max_new_tokens 1024] \
      [--language zh|en] [--min_pixels N --max_pixels N] [--config CONFIG] [--batch_size 8] [--dtype bfloat16]

Each record's student image gets the same prompt as in training: up to --num_teachers
demonstrations first (the record's own teachers when it has them, else distinct entries of
--teacher_pool chosen with --seed, never one showing the student's image), then the student's
image(s) and instruction. Use the pixel limits the model was trained (and the data converted) with:
language and pixel limits default to --config's data group (the config the model was trained with).

Output, one JSON object per line, in input order (what scripts/visualize.py draws):
  {"id", "images": [paths relative to the output file's folder], "gt": [...], "pred": [...],
   "response": the generated text, "parse_status": {"code", "num_objects", "dropped"}}
with boxes in pixels of the stored image file (the frame of the JSONL's own boxes, which
scripts/visualize.py draws on).
The output's folder is created and checked to be writable before any work; the file is written
atomically, and any generated text fits in it (a lone surrogate stays a \\u escape). Prints parse
failures, empty outputs and precision/recall/F1 at IoU >= 0.5 with desc match. Exit status: 0 done,
1 a bad path, model folder or record (one line) or no usable records.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bbu_jax.data.chat import LANGUAGES
from bbu_jax.training.task import DTYPES

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="Hugging Face Qwen2.5-VL folder")
    p.add_argument("--input_jsonl", required=True)
    p.add_argument("--output_file", required=True)
    p.add_argument("--num_teachers", type=int, default=1, help="demonstrations before the student (0: none)")
    p.add_argument("--teacher_pool", default=None, help="JSONL whose students serve as demonstrations")
    p.add_argument("--max_samples", type=int, default=None, help="only the first N records")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the training config (defaults below)")
    p.add_argument("--language", choices=LANGUAGES, default=None, help="default: the config's data.language")
    p.add_argument("--min_pixels", type=int, default=None, help="default: the config's data.min_pixels")
    p.add_argument("--max_pixels", type=int, default=None, help="default: the config's data.max_pixels")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generation call")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="teacher choice and sampling")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="parameter and compute dtype (bfloat16 on GPU)")
    p.add_argument("--length_bucket", type=int, default=256, help="prompt lengths are padded to multiples")
    p.add_argument("--patch_bucket", type=int, default=1024, help="patch counts are padded to multiples")
    p.add_argument("--skip_bad_samples", action="store_true", help="skip and count bad records")
    args = p.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max_samples must be >= 1")
    if args.num_teachers > 0 and args.teacher_pool is None:
        print("note: no --teacher_pool; only records with their own teachers get demonstrations",
              file=sys.stderr)

    from bbu_jax.data.encode import SampleEncoder
    from bbu_jax.data.schema import load_records
    from bbu_jax.evaluation.metrics import generate_metrics
    from bbu_jax.foundation.files import check_writable, write_jsonl_atomic
    from bbu_jax.inference.answers import generate_answers
    from bbu_jax.models.qwen2_5_vl import from_hf
    from bbu_jax.workflows.config import build_specs, load_config

    try:  # everything that can be checked before the long part: a bad path or file fails now
        out_dir = str(check_writable(args.output_file).parent)
        data = build_specs(load_config(args.config)).data
        for key in ("language", "min_pixels", "max_pixels"):
            if getattr(args, key) is None:
                setattr(args, key, getattr(data, key))
        records, errors = load_records(args.input_jsonl, skip_bad_samples=args.skip_bad_samples)
        records = records[:args.max_samples]
        pool = []
        if args.teacher_pool:
            pool_records, pool_errors = load_records(args.teacher_pool, skip_bad_samples=args.skip_bad_samples)
            pool, errors = [r.student for r in pool_records], errors + pool_errors
        encoder = SampleEncoder(args.model_path, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                language=args.language)
        dtype = DTYPES[args.dtype]
        model = from_hf(args.model_path, dtype, compute_dtype=dtype)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    answers, bad = generate_answers(
        model, encoder, records, pool, num_teachers=args.num_teachers, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        length_bucket=args.length_bucket, patch_bucket=args.patch_bucket,
        skip_bad_samples=args.skip_bad_samples)
    elapsed = time.perf_counter() - start
    errors += bad
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    if not answers:
        print(f"{args.input_jsonl}: no usable records", file=sys.stderr)
        return 1
    lines = [{"id": a.record.id, "images": [os.path.relpath(x, out_dir) for x in a.record.student.images],
              "gt": a.gt, "pred": a.pred, "response": a.response, "parse_status": a.status.to_dict()}
             for a in answers]
    write_jsonl_atomic(args.output_file, lines)  # any generated text, a lone surrogate included

    m = generate_metrics([a.gt for a in answers], [a.pred for a in answers], [a.status for a in answers])
    print(f"wrote {len(lines)} predictions to {args.output_file} in {elapsed:.1f}s"
          + (f" ({len(errors)} bad records skipped)" if errors else ""))
    print(f"parse failures {m['parse_failures']}, empty outputs {m['generate/empty_outputs']}, "
          f"truncated {m['generate/truncated']}, dropped objects {m['generate/dropped_objects']}")
    print(f"generate/precision {m['generate/precision']:.4f}  generate/recall {m['generate/recall']:.4f}  "
          f"generate/f1 {m['generate/f1']:.4f}  caption_accuracy {m['caption_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
