"""bbu_jax params checkpoint -> HF Qwen2.5-VL folder that transformers loads; see
bbu_jax.workflows.export.

    python -m convert_weights.flax_to_hf --checkpoint CKPT --out HF_DIR [--base_hf_dir D]
        [--dtype float32|bfloat16] [--max_shard_gb G] [--overwrite]

Writes config.json, safetensors in the released checkpoints' key layout (`model.layers.*`,
`visual.*`; no lm_head when embeddings are tied), and the tokenizer / chat template / processor
files of the base model (CKPT/hf/ unless --base_hf_dir is given).
"""
from __future__ import annotations

import argparse
import sys
import time

from bbu_jax.workflows.export import EXPORT_DTYPES, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="folder written by hf_to_flax or a training export")
    parser.add_argument("--out", required=True, help="HF output folder, written atomically; not --checkpoint, "
                                                     "--base_hf_dir or a folder containing either or inside either")
    parser.add_argument("--base_hf_dir", default=None, help="tokenizer/processor files (default: CKPT/hf)")
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES))
    parser.add_argument("--max_shard_gb", type=float, default=5.0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.base_hf_dir, dtype=args.dtype,
                                max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
