"""Convert raw LabelMe/COCO annotations into rescaled images + train/val/teacher_pool JSONL.

  python scripts/convert_dataset.py --input_dir RAW --format labelme --output_dir OUT \
      --min_pixels 3136 --max_pixels 200704 --val_ratio 0.1 --teacher_pool_size 16 --seed 0 \
      [--language zh|en] [--desc_map MAP.json] [--skip_bad_samples] [--strict] [--overwrite] \
      [--num_workers 2]

Use the SAME min/max pixels as training. --language rewrites descs through the zh<->en table
(--desc_map, default RAW/desc_map.json). A box overhanging its photo is clipped and an unusable
object (degenerate, empty desc) dropped, each counted and listed in OUT/summary.json; --strict
makes either a bad record instead (an error, or a skipped photo with --skip_bad_samples). A
non-empty OUT is replaced only with --overwrite, and only once the new dataset is complete.
Exit status 0 on success, 1 (with the reason on stderr) when nothing was written.
"""
import argparse
import sys

from bbu_jax.data.chat import LANGUAGES
from bbu_jax.data.convert import convert_dataset
from bbu_jax.data.readers import READERS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", required=True)
    p.add_argument("--format", required=True, choices=sorted(READERS))
    p.add_argument("--output_dir", required=True)
    p.add_argument("--min_pixels", type=int, required=True)
    p.add_argument("--max_pixels", type=int, required=True)
    p.add_argument("--val_ratio", type=float, required=True)
    p.add_argument("--teacher_pool_size", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--language", choices=LANGUAGES, default=None)
    p.add_argument("--desc_map", default=None)
    p.add_argument("--skip_bad_samples", action="store_true", help="count and skip bad records instead of failing")
    p.add_argument("--strict", action="store_true",
                   help="an overhanging box or an unusable object makes its whole photo a bad record")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    p.add_argument("--num_workers", type=int, default=2)
    args = p.parse_args(argv)
    try:
        summary = convert_dataset(
            args.input_dir, args.format, args.output_dir, min_pixels=args.min_pixels,
            max_pixels=args.max_pixels, val_ratio=args.val_ratio, teacher_pool_size=args.teacher_pool_size,
            seed=args.seed, language=args.language, desc_map_path=args.desc_map,
            skip_bad_samples=args.skip_bad_samples, strict=args.strict, overwrite=args.overwrite,
            num_workers=args.num_workers)
    except (OSError, ValueError) as e:  # bad input, or an output folder that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"images {summary['images']}, objects {summary['objects']}, skipped {summary['skipped']['count']}, "
          f"clipped boxes {summary['clipped_boxes']['count']}, dropped objects "
          f"{summary['dropped_objects']['count']} -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
