"""Generate grounding answers for a JSONL file and write them as a predictions file.

  python scripts/infer.py --model MODEL --data val.jsonl --output preds.jsonl [--max_samples N]

--model is an HF export of a training run, a run folder (its newest readable checkpoint) or one
checkpoint step (RUN/checkpoints/STEP). Every setting defaults to what the model was trained with
(recorded beside its weights): answer language and prompt, pixel limits, the number of
demonstrations and the teacher pool they come from. A flag overrides it; one that contradicts
the trained value prints a warning naming both. Each record's student image gets the training
prompt: the demonstrations first (the record's own teachers when it has them, else distinct pool
entries chosen with --seed, never one showing the student's image), then the image and instruction.

Output, one JSON object per line, in input order (what scripts/visualize.py draws):
  {"id", "images": [paths relative to the output file's folder], "gt": [...], "pred": [...],
   "response": the generated text, "parse_status": {"code", "num_objects", "dropped"}}
with boxes in pixels of the stored image file (the frame of the JSONL's own boxes). The output's
folder is created and checked to be writable before any work; an existing output is replaced only
with --overwrite; the file is written atomically. Prints parse failures, empty outputs and
precision/recall/F1 at IoU >= 0.5 with the full desc equal. Exit status: 0 done, 1 a bad path,
model folder or record (one line) or no usable records.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from bbu_jax.workflows.cli import HelpFormatter, add_model_flags, load_predictor

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_flags(p)
    p.add_argument("--output", required=True, help="predictions JSONL (written atomically)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="teacher choice and sampling")
    args = p.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max_samples must be >= 1")
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING, force=True)

    from bbu_jax.data.schema import load_records
    from bbu_jax.evaluation.metrics import generate_metrics
    from bbu_jax.foundation.files import check_new_output, write_jsonl_atomic
    from bbu_jax.inference.answers import generate_answers, prediction_row

    try:  # everything that can be checked before the long part: a bad path or file fails now
        out = check_new_output(args.output, overwrite=args.overwrite)
        records, errors = load_records(args.data, skip_bad_samples=args.skip_bad_samples)
        records = records[:args.max_samples]
        predictor = load_predictor(args)
        pool = predictor.demonstrations(predictor.num_teachers)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    answers, bad = generate_answers(
        predictor.model, predictor.encoder, records, pool, num_teachers=predictor.num_teachers,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, skip_bad_samples=args.skip_bad_samples)
    elapsed = time.perf_counter() - start
    errors += bad
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    if not answers:
        print(f"{args.data}: no usable records", file=sys.stderr)
        return 1
    write_jsonl_atomic(out, [prediction_row(a.record.id, a.record.student.images, a.gt, a.pred, out.parent,
                                            response=a.response, status=a.status) for a in answers])

    m = generate_metrics([a.gt for a in answers], [a.pred for a in answers], [a.status for a in answers])
    print(f"wrote {len(answers)} predictions to {out} in {elapsed:.1f}s"
          + (f" ({len(errors)} bad records skipped)" if errors else ""))
    print(f"parse failures {m['generate/parse_failures']}, empty outputs {m['generate/empty_outputs']}, "
          f"truncated {m['generate/truncated']}, dropped objects {m['generate/dropped_objects']}")
    print(f"generate/precision {m['generate/precision']:.4f}  generate/recall {m['generate/recall']:.4f}  "
          f"generate/f1 {m['generate/f1']:.4f}  generate/caption_accuracy {m['generate/caption_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
