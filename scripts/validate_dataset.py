"""Validate JSONL datasets: prints every problem as FILE:LINE: reason; exit status 1 when any.

  python scripts/validate_dataset.py OUT/train.jsonl [OUT/val.jsonl ...]
"""
import argparse
import sys

from bbu_jax.data.validate import validate_jsonl


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE.jsonl")
    args = parser.parse_args(argv)
    bad = 0
    for path in args.files:
        try:
            problems = validate_jsonl(path)
        except OSError as e:
            problems = [f"{path}: {e}"]
        for p in problems:
            print(p)
        bad += len(problems)
        if not problems:
            print(f"{path}: ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
