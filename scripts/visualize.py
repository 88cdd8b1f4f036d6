"""Draw ground truth next to predictions for every record of a JSONL file, plus contact sheets.

  python scripts/visualize.py --data preds.jsonl --output viz [--max_samples N] [--overwrite]

Input: the predictions file scripts/infer.py writes — one JSON object per line,
  {"images": ["images/a.jpeg"], "gt": [{"bbox_2d": [x1, y1, x2, y2], "desc": "..."}],
   "pred": [{"bbox_2d": [...], "desc": "...", "score": 0.93}], ...}
with image paths relative to the JSONL's folder and boxes in original-image pixels ("gt", "pred"
and "score" are each optional) — or a training JSONL, drawn as ground truth. Output: one PNG per
record (NNNNN_<image>.png: GT left, prediction right; green = right box and desc, orange = right
box, wrong desc, red = missed / false, blue = nothing to compare with) and contact_sheet_NNN.png
grids. Chinese descs need a CJK font (found automatically, or --font); without one CJK text shows
as '?'. A non-empty --output folder is written into only with --overwrite.
"""
import argparse
import pathlib
import sys

from bbu_jax.evaluation.visualize import find_cjk_font, load_records, write_visualizations
from bbu_jax.workflows.cli import HelpFormatter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="predictions file (infer.py, evaluate.py) or a training JSONL")
    p.add_argument("--output", required=True, help="folder for the pictures")
    p.add_argument("--max_samples", type=int, default=None, help="only the first N records (default: all)")
    p.add_argument("--min_score", type=float, default=0.0, help="hide predictions scored below this")
    p.add_argument("--panel_size", type=int, default=768, help="longer side of each panel, pixels")
    p.add_argument("--sheet_size", type=int, default=48, help="records per contact sheet")
    p.add_argument("--columns", type=int, default=4, help="contact sheet columns")
    p.add_argument("--font", default=None,
                   help="TrueType/OpenType font file (default: a CJK font if one is installed)")
    p.add_argument("--skip_bad_samples", action="store_true",
                   help="skip and count bad records instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    args = p.parse_args(argv)
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max_samples must be >= 1")
    out = pathlib.Path(args.output)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} is not empty; pass --overwrite to write into it", file=sys.stderr)
        return 1

    records, errors = load_records(args.data, skip_errors=args.skip_bad_samples)
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    records = records[:args.max_samples]
    if not records:
        print(f"{args.data}: no records to draw", file=sys.stderr)
        return 1
    font = args.font if args.font is not None else find_cjk_font()
    if font is None:
        print("no CJK font found (install fonts-noto-cjk or fonts-wqy-microhei, or pass --font): "
              "Chinese text is drawn as '?'", file=sys.stderr)
    paths, bad_images = write_visualizations(
        records, args.output, min_score=args.min_score, panel_size=args.panel_size,
        sheet_size=args.sheet_size, columns=args.columns, font_path=font or "",
        skip_errors=args.skip_bad_samples)
    for e in bad_images:
        print(f"skipped {e}", file=sys.stderr)
    errors += bad_images
    sheets = sum("contact_sheet_" in p for p in paths)
    if not paths:
        print(f"{args.data}: no picture could be drawn", file=sys.stderr)
        return 1
    print(f"wrote {len(paths) - sheets} pictures and {sheets} contact sheet(s) to {args.output}"
          + (f" ({len(errors)} bad records skipped)" if errors else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
