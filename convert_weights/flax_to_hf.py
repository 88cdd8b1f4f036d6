"""bbu_jax params checkpoint -> HF Qwen2.5-VL folder that transformers loads.

    python -m convert_weights.flax_to_hf --checkpoint CKPT --out HF_DIR [--base_hf_dir D]
        [--dtype float32|bfloat16] [--max_shard_gb G]

Writes config.json, safetensors in the released checkpoints' key layout (`model.layers.*`,
`visual.*`; no lm_head when embeddings are tied), and the tokenizer / chat template / processor
files of the base model (CKPT/hf/ unless --base_hf_dir is given).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bbu_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, to_hf_state_dict
from bbu_jax.models.qwen2_5_vl.params import abstract_model
from convert_weights.hf_files import atomic_dir, copy_side_files, save_safetensors_shards
from convert_weights.hf_to_flax import FORMAT, META_FILE

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def load_params_checkpoint(checkpoint: str | Path) -> tuple[Qwen25VL, Path]:
    """The model stored by hf_to_flax (or a training export) and its folder of HF side files."""
    ckpt = Path(checkpoint).absolute()
    meta_file = ckpt / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{ckpt}: no {META_FILE}; not a bbu_jax params checkpoint "
                                f"(made by convert_weights.hf_to_flax or a training run's export)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    hf_files = ckpt / "hf"
    cfg = Qwen25VLConfig.from_file(hf_files / "config.json")
    graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    restored = ocp.StandardCheckpointer().restore(ckpt / "params", nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest), hf_files


def export(model: Qwen25VL, out: str | Path, base_hf_dir: str | Path, *, dtype: str = "float32",
           max_shard_bytes: int | None = 5 * 2**30) -> Path:
    """Write an HF folder for ``model`` with ``base_hf_dir``'s tokenizer and processor files."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(DTYPES)}")
    base = Path(base_hf_dir)
    weights = to_hf_state_dict(model, layout="legacy", dtype=DTYPES[dtype])
    config = model.config.to_hf_dict()
    config["torch_dtype"] = dtype
    with atomic_dir(Path(out)) as tmp:
        save_safetensors_shards(weights, tmp, max_shard_bytes)
        copied = copy_side_files(base, tmp)
        if "tokenizer_config.json" not in copied and "tokenizer.json" not in copied:
            raise FileNotFoundError(f"{base}: no tokenizer files to copy into the export")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="folder written by hf_to_flax or a training export")
    parser.add_argument("--out", required=True, help="HF output folder (replaced atomically)")
    parser.add_argument("--base_hf_dir", default=None, help="tokenizer/processor files (default: CKPT/hf)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--max_shard_gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    model, hf_files = load_params_checkpoint(args.checkpoint)
    out = export(model, args.out, args.base_hf_dir or hf_files, dtype=args.dtype,
                 max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
