"""HF Qwen2.5-VL folder -> bbu_jax params checkpoint (orbax); see bbu_jax.workflows.export.

    python -m convert_weights.hf_to_flax --hf_dir HF_DIR --out OUT [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import time

from bbu_jax.workflows.export import LOAD_DTYPES, convert


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="HF Qwen2.5-VL folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--dtype", default="float32", choices=sorted(LOAD_DTYPES),
                        help="stored precision (bfloat16: lossless for bf16 checkpoints, half the memory)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = convert(args.hf_dir, args.out, args.dtype)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
