"""HF Qwen2.5-VL folder -> bbu_jax params checkpoint (orbax); see bbu_jax.workflows.export.

    python -m convert_weights.hf_to_flax --hf_dir HF_DIR --out OUT [--dtype float32|bfloat16] [--overwrite]
"""
from __future__ import annotations

import argparse
import sys
import time

from bbu_jax.workflows.export import LOAD_DTYPES, convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="HF Qwen2.5-VL folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output folder, written atomically; not --hf_dir or "
                                                     "a folder containing it or inside it")
    parser.add_argument("--dtype", default="float32", choices=sorted(LOAD_DTYPES),
                        help="stored precision (bfloat16: lossless for bf16 checkpoints, half the memory)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert(args.hf_dir, args.out, args.dtype, overwrite=args.overwrite)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
