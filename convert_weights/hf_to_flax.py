"""HF Qwen2.5-VL folder -> bbu_jax params checkpoint (orbax).

    python -m convert_weights.hf_to_flax --hf_dir HF_DIR --out OUT

OUT/params/ holds the model parameters as an orbax checkpoint (a pure dict of arrays, restorable
onto any mesh; restoring casts to the model's float32 params, so `--dtype bfloat16` is lossless for
the released bf16 checkpoints and halves the conversion's memory), OUT/hf/ the source's config.json, tokenizer and processor files (so
an export needs nothing else), OUT/bbu_jax.json what this is and where it came from.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from bbu_jax.models.qwen2_5_vl import from_hf
from convert_weights.hf_files import atomic_dir, copy_side_files

FORMAT = "bbu_jax.params"
META_FILE = "bbu_jax.json"


def save_params_checkpoint(model: nnx.Module, out: Path, hf_files_from: Path, source: str) -> Path:
    """Write ``model``'s params + the HF side files atomically to ``out``."""
    with atomic_dir(Path(out)) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save((tmp / "params").absolute(), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        ckptr.wait_until_finished()
        (tmp / "hf").mkdir()
        shutil.copy2(hf_files_from / "config.json", tmp / "hf" / "config.json")
        copy_side_files(hf_files_from, tmp / "hf")
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "version": 1, "source": source}, indent=2))
    return Path(out)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def convert(hf_dir: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: not a folder")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(DTYPES)}")
    model = from_hf(hf_dir, dtype=DTYPES[dtype])
    return save_params_checkpoint(model, Path(out), hf_dir, source=str(hf_dir.absolute()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf_dir", required=True, help="HF Qwen2.5-VL folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="stored precision (bfloat16: lossless for bf16 checkpoints, half the memory)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = convert(args.hf_dir, args.out, args.dtype)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
