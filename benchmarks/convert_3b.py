"""Conversion cost at the 3B shape: HF safetensors -> bbu_jax params, against merely reading them.

    python benchmarks/convert_3b.py [--text_layers N] [--workdir DIR]

Writes (or reuses, in --workdir) a random checkpoint with Qwen2.5-VL-3B's shapes (bf16 on disk, sharded like the release;
fewer text layers when memory is short), then runs each step in a fresh process so every peak
RSS is its own: (1) read every tensor with safetensors, (2) from_hf (float32 params on the
device), (3) hf_to_flax (from_hf + orbax save) storing bf16 and storing f32. A step that runs
out of memory is reported as such. Last line: `convert_3b: hf_to_flax_bf16/read = RATIO`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = {
    "read": "from bbu_jax.models.qwen2_5_vl.params import weight_files\n"
            "from safetensors import safe_open\n"
            "files = weight_files(HF)\n"
            "n = 0\n"
            "for f in sorted(set(files.values())):\n"
            "    with safe_open(f, 'numpy') as h:\n"
            "        for k in h.keys(): n += h.get_tensor(k).nbytes\n",
    "from_hf": "import jax\nfrom bbu_jax.models.qwen2_5_vl import from_hf\n"
               "m = from_hf(HF)\njax.block_until_ready(m.language_model.norm.weight[...])\n",
    "hf_to_flax_bf16": "from bbu_jax.workflows.export import convert\nconvert(HF, OUT, 'bfloat16', overwrite=True)\n",
    "hf_to_flax_f32": "from bbu_jax.workflows.export import convert\nconvert(HF, OUT, 'float32', overwrite=True)\n",
}


def run_step(name: str, hf: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS GiB) of one step in a fresh interpreter (imports excluded from time)."""
    code = ("import time, json, resource\nfrom pathlib import Path\n"
            f"HF, OUT = Path({str(hf)!r}), Path({str(out)!r})\n"
            "import jax, flax, orbax.checkpoint, safetensors\n"
            "t0 = time.perf_counter()\n" + STEPS[name] +
            "print(json.dumps({'s': time.perf_counter() - t0, "
            "'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))\n")
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    if res.returncode == -9:  # the kernel's OOM killer
        return float("nan"), float("nan")
    if res.returncode:
        raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    return figures["s"], figures["rss"]


def write_checkpoint(hf: Path, text_layers: int) -> None:
    """Random weights with Qwen2.5-VL-3B's shapes (``Qwen25VLConfig()``), bf16 and sharded like the release."""
    import ml_dtypes

    from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig
    from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl

    t, v = Qwen25VLConfig().text, Qwen25VLConfig().vision
    write_tiny_qwen2_5_vl(
        hf, weights_dtype=ml_dtypes.bfloat16, max_shard_bytes=4 * 2**30,
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=text_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        rope_scaling={"type": "mrope", "mrope_section": list(t.mrope_section)},
        vision_depth=v.depth, vision_hidden_size=v.hidden_size, vision_intermediate_size=v.intermediate_size,
        vision_num_heads=v.num_heads, vision_out_hidden_size=v.out_hidden_size,
        vision_fullatt_block_indexes=list(v.fullatt_block_indexes))


def main() -> None:
    from benchmarks._common import record
    from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text_layers", type=int, default=None, help="default: the 3B's")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    text_layers = args.text_layers or Qwen25VLConfig().text.num_hidden_layers
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_3b_"))
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        write_checkpoint(hf, text_layers)
    disk = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**30
    print(f"3B-shape checkpoint: {text_layers} text layers, {disk:.2f} GiB bf16")
    rows = {name: run_step(name, hf, work / name) for name in STEPS}
    print(f"{'step':<16}{'seconds':>10}{'peak RSS GiB':>14}")
    for name, (s, rss) in rows.items():
        print(f"{name:<16}{s:>10.1f}{rss:>14.2f}" + ("   (killed: out of memory)" if s != s else ""))
    ratio = rows["hf_to_flax_bf16"][0] / rows["read"][0]
    record("convert_3b", f"convert_3b: hf_to_flax_bf16/read = {ratio:.1f}", text_layers=text_layers,
           checkpoint_gib=disk, **{f"{k}_s": v[0] for k, v in rows.items()},
           **{f"{k}_peak_rss_gib": v[1] for k, v in rows.items()})


if __name__ == "__main__":
    main()
