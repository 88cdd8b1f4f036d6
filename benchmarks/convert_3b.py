"""Loading and exporting the 3B's weights, against transformers and against moving the same bytes.

    python benchmarks/convert_3b.py [--text_layers N] [--workdir DIR] [--repeats R] [--keep_caches]

Writes (or reuses, in --workdir) a random checkpoint with Qwen2.5-VL-3B's shapes (bf16 on disk, sharded like the
release; fewer text layers when memory is short), then runs each step in a fresh process, so that every
peak RSS is its own and no step finds another's memory or compiled code, after dropping the page cache
(root; --keep_caches to skip it) and reading the files the step reads (untimed), so that each starts
from the same memory whatever ran before it:

- read: every tensor read with safetensors (the raw read);
- transformers_f32 / transformers_bf16: ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` of the
  same folder (local files only);
- from_hf_f32 / from_hf_bf16: bbu_jax's ``from_hf`` (params on the device, float32 for training,
  bfloat16 for inference);
- hf_to_flax: from_hf + an orbax params checkpoint (float32, as training stores its params);
- read_ckpt / restore: every file of that checkpoint read / ``load_params_checkpoint`` (orbax restore);
- export / write: ``export`` of the restored model to an HF folder (bfloat16, as released) / writing
  the same bytes from memory.

With --repeats R each step runs R times (alternating with the others) and its fastest run counts.
Last line: ``convert_3b: from_hf/transformers = RATIO`` (float32 params).
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

# step -> (untimed setup, timed code); HF, CKPT, OUT are the folders
STEPS = {
    "read": ("from bbu_jax.models.qwen2_5_vl.params import weight_files\nfrom safetensors import safe_open\n",
             "for f in sorted(set(weight_files(HF).values())):\n"
             "    with safe_open(f, 'numpy') as h:\n"
             "        tensors = [h.get_tensor(k) for k in h.keys()]\n"
             "    del tensors\n"),
    "transformers_f32": ("import torch\nfrom transformers import Qwen2_5_VLForConditionalGeneration as M\n",
                         "m = M.from_pretrained(HF, dtype=torch.float32, local_files_only=True)\n"),
    "transformers_bf16": ("import torch\nfrom transformers import Qwen2_5_VLForConditionalGeneration as M\n",
                          "m = M.from_pretrained(HF, dtype=torch.bfloat16, local_files_only=True)\n"),
    "from_hf_f32": ("from bbu_jax.models.qwen2_5_vl import from_hf\n",
                    "m = from_hf(HF)\njax.block_until_ready(nnx.state(m))\n"),
    "from_hf_bf16": ("from bbu_jax.models.qwen2_5_vl import from_hf\n",
                     "m = from_hf(HF, jnp.bfloat16)\njax.block_until_ready(nnx.state(m))\n"),
    "hf_to_flax": ("from bbu_jax.workflows.export import convert\n",
                   "convert(HF, CKPT, 'float32', overwrite=True)\n"),
    "read_ckpt": ("files = sorted(p for p in (CKPT / 'params').rglob('*') if p.is_file())\n",
                  "data = [p.read_bytes() for p in files]\n"),
    "restore": ("from bbu_jax.workflows.export import load_params_checkpoint\n",
                "m, _ = load_params_checkpoint(CKPT)\njax.block_until_ready(nnx.state(m))\n"),
    "export": ("from bbu_jax.workflows.export import export, load_params_checkpoint\n"
               "m, hf_files = load_params_checkpoint(CKPT)\njax.block_until_ready(nnx.state(m))\n",
               "export(m, OUT, hf_files, dtype='bfloat16', overwrite=True)\n"),
    "write": ("import shutil\nsrc = {p.name: p.read_bytes() for p in sorted((OUT.parent / 'export').iterdir())\n"
              "       if p.suffix == '.safetensors'}\nshutil.rmtree(OUT, ignore_errors=True)\nOUT.mkdir()\n",
              "for name, data in src.items():\n    (OUT / name).write_bytes(data)\n"),
}
# the folder each step reads, read once untimed before it: every step finds its input in the page cache,
# whatever the step before it evicted (where the machine's memory holds little beyond a step's peak, a
# step run after one that filled it would read from disk and its baseline would not)
READS = {"read": "HF", "transformers_f32": "HF", "transformers_bf16": "HF", "from_hf_f32": "HF", "from_hf_bf16": "HF",
         "hf_to_flax": "HF", "read_ckpt": "CKPT", "restore": "CKPT"}
WARM = ("for p in sorted({folder}.rglob('*')):\n    if p.is_file():\n        with open(p, 'rb') as f:\n"
        "            while f.read(1 << 26):\n                pass\n")
# the step whose time each is measured against, for the printed ratios
BASELINES = {"from_hf_f32": "transformers_f32", "from_hf_bf16": "read", "transformers_bf16": "read",
             "restore": "read_ckpt", "export": "write"}


def drop_page_cache() -> bool:
    """Writes the dirty pages out and drops the clean ones from the page cache, where allowed (root):
    each step then starts with the same free memory, not with what the steps before it left cached.
    False where not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def run_step(name: str, work: Path, drop_caches: bool = False) -> tuple[float, float]:
    """(seconds, peak RSS GiB) of one step in a fresh interpreter (imports and setup excluded from time)."""
    setup, timed = STEPS[name]
    if drop_caches and not drop_page_cache():
        raise PermissionError("cannot drop the page cache (/proc/sys/vm/drop_caches; root only): "
                              "run as root or with --keep_caches")
    code = ("import time, json, resource\nfrom pathlib import Path\n"
            f"HF, CKPT, OUT = Path({str(work / 'hf')!r}), Path({str(work / 'ckpt')!r}), Path({str(work / name)!r})\n"
            "import jax, jax.numpy as jnp, flax, orbax.checkpoint, safetensors\nfrom flax import nnx\n"
            + (WARM.format(folder=READS[name]) if name in READS else "") + setup
            + "t0 = time.perf_counter()\n" + timed +
            "print(json.dumps({'s': time.perf_counter() - t0, "
            "'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))\n")
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "HF_HUB_OFFLINE": "1"}
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
    import jax
    from flax import nnx

    from benchmarks._common import record
    from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig
    from bbu_jax.models.qwen2_5_vl.params import abstract_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text_layers", type=int, default=None, help="default: the 3B's")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each step; the fastest counts")
    parser.add_argument("--keep_caches", action="store_true",
                        help="do not drop the page cache before each step (it needs root): where memory holds "
                             "little beyond a step's peak, each step then pays for what the steps before it left")
    args = parser.parse_args()
    text_layers = args.text_layers or Qwen25VLConfig().text.num_hidden_layers
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_3b_"))
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        write_checkpoint(hf, text_layers)
    disk = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**30
    params = sum(v.size * 4 for v in jax.tree.leaves(nnx.state(abstract_model(Qwen25VLConfig.from_file(
        hf / "config.json")), nnx.Param))) / 2**30
    print(f"3B-shape checkpoint: {text_layers} text layers, {disk:.2f} GiB bf16; "
          f"float32 params {params:.2f} GiB")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in STEPS}
    for _ in range(args.repeats):
        for name in STEPS:
            runs[name].append(run_step(name, work, drop_caches=not args.keep_caches))
    rows = {name: (min(r[0] for r in rs), max(r[1] for r in rs)) for name, rs in runs.items()}
    print(f"{'step':<18}{'seconds':>10}{'peak RSS GiB':>14}  vs")
    for name, (s, rss) in rows.items():
        base = BASELINES.get(name)
        vs = f"  {s / rows[base][0]:.2f}x {base}" if base else ""
        print(f"{name:<18}{s:>10.1f}{rss:>14.2f}{vs}" + ("   (killed: out of memory)" if s != s else ""))
    ratio = rows["from_hf_f32"][0] / rows["transformers_f32"][0]
    record("convert_3b", f"convert_3b: from_hf/transformers = {ratio:.2f}", text_layers=text_layers,
           checkpoint_gib=disk, params_f32_gib=params, repeats=args.repeats, drop_caches=not args.keep_caches,
           **{f"{k}_s": v[0] for k, v in rows.items()},
           **{f"{k}_peak_rss_gib": v[1] for k, v in rows.items()})


if __name__ == "__main__":
    main()
