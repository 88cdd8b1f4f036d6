"""Loader throughput at the 3B run's budgets, against what the 3B train step consumes.

The training loader (``make_train_iterator``) with ``configs/base.py``'s data spec: its batch
budgets (rows, tokens, patches, samples per packed row, ...), pixel limits, teacher ratio,
teacher count and language. The data are synthetic scenes enlarged ``--scale`` times (so
conversion resizes them down to ``max_pixels`` as it would field photos), converted as
``scripts/convert_dataset.py`` does. Tokenizer: the tiny test
tokenizer (``bbu_jax.workflows.tiny_model``; no model hub), whose text is longer per character than Qwen's.

Consumption: each batch's model FLOPs for the 3B (``bbu_jax.training.flops.batch_flops``: the batch's own
segments and image grids) at ``--mfu`` of ``--peak_tflops`` are the GPU-seconds of training it
holds; GPU-seconds produced per second of loading = how many GPUs this loader keeps busy. Measured
for the packed collator with 0 (in the main process), 1, 2 grain workers, and for the standard
collator (one sample per row) alongside; the first batch (worker start-up, tokenizer loading) is
excluded.

  python benchmarks/loader.py [--num_images 200] [--scale 2] [--batches 16] [--workers 0 1 2]

Last line: `loader: N worker(s) feed X GPUs (3B step at 50% MFU, packed)`; appends a JSON record
to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record, run_specs  # noqa: E402
from bbu_jax.data.batch import check_batch  # noqa: E402
from bbu_jax.data.collate import fill_rate  # noqa: E402
from bbu_jax.data.convert import convert_dataset  # noqa: E402
from bbu_jax.data.encode import SampleEncoder  # noqa: E402
from bbu_jax.data.pipeline import make_train_iterator  # noqa: E402
from bbu_jax.data.synthetic import write_labelme_dataset  # noqa: E402
from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig  # noqa: E402
from bbu_jax.training.flops import batch_flops, batch_layout  # noqa: E402
from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl  # noqa: E402


def run(spec, data: str, model: str, collator: str, workers: int, batches: int, gpu_flops: float) -> dict:
    """Throughput, fill and the GPU-seconds of 3B training in ``batches`` batches of one loader
    (``spec``: the run's data spec)."""
    spec = dataclasses.replace(spec, train_jsonl=os.path.join(data, "train.jsonl"),
                               teacher_pool_jsonl=os.path.join(data, "teacher_pool.jsonl"), collator=collator,
                               workers=workers, segments_per_row=spec.segments_per_row if collator == "packed" else 1)
    budgets = spec.budgets(rows=spec.batch_rows, segments=spec.segments_per_row)
    encoder = SampleEncoder(model, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, language=spec.language)
    it = make_train_iterator(spec, encoder, seed=0)
    check_batch(next(it), budgets.dims())  # start-up excluded
    kept = []
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        kept.append({k: b[k] for k in ("segment_ids", "patch_image_ids", "patch_pos", "target_kind")})
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    cfg = Qwen25VLConfig()  # the 3B
    work = sum(batch_flops(cfg, b) for b in kept)
    fills = np.mean([fill_rate(b) for b in kept], 0)
    tokens = sum(int((b["segment_ids"] > 0).sum()) for b in kept)
    patches = sum(int((b["patch_image_ids"] > 0).sum()) for b in kept)
    samples = sum(len(row) for b in kept for row in batch_layout(b)[0])
    return {"collator": collator, "workers": workers, "rows_per_s": batches * budgets.rows / dt,
            "samples_per_s": samples / dt, "tokens_per_s": tokens / dt, "patches_per_s": patches / dt,
            "token_fill": float(fills[0]), "patch_fill": float(fills[1]),
            "samples_per_row": samples / (batches * budgets.rows),
            "gpus_fed": work / gpu_flops / dt, "step_s_per_row": work / gpu_flops / (batches * budgets.rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=200)
    p.add_argument("--scale", type=int, default=2, help="enlarge the synthetic scenes (field photos exceed max_pixels)")
    p.add_argument("--batches", type=int, default=16, help="timed batches per loader (batch_rows rows each)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mfu", type=float, default=0.5, help="the 3B step's MFU the loader has to keep up with")
    p.add_argument("--peak_tflops", type=float, default=None, help="per GPU (default: configs/base.py's)")
    p.add_argument("--no-record", dest="record", action="store_false")
    args = p.parse_args()
    specs = run_specs()
    d = specs.data
    peak = args.peak_tflops or specs.run.peak_tflops_per_device
    gpu_flops = args.mfu * peak * 1e12
    with tempfile.TemporaryDirectory() as tmp:
        raw, data = os.path.join(tmp, "raw"), os.path.join(tmp, "data")
        write_labelme_dataset(raw, args.num_images, seed=0, scale=args.scale)
        convert_dataset(raw, "labelme", data, min_pixels=d.min_pixels, max_pixels=d.max_pixels, val_ratio=0.1,
                        teacher_pool_size=max(1, args.num_images // 10), seed=0, language=d.language, progress=False)
        model = str(write_tiny_qwen2_5_vl(os.path.join(tmp, "tiny")))
        rows = [run(d, data, model, "standard", 0, args.batches, gpu_flops)]
        rows += [run(d, data, model, "packed", w, args.batches, gpu_flops) for w in args.workers]
    budgets = dataclasses.asdict(d.budgets(rows=d.batch_rows, segments=d.segments_per_row))
    print(f"configs/base.py budgets {budgets}; pixels {d.min_pixels}..{d.max_pixels}, teacher ratio "
          f"{d.teacher_ratio}, max teachers {d.max_teachers}, language {d.language}; scenes x{args.scale}; "
          f"{os.cpu_count()} cpus; consumption: 3B step at {args.mfu:.0%} MFU of {peak:g} TFLOP/s per GPU")
    print(f"{'collator':9} {'workers':>7} {'rows/s':>7} {'samples/s':>9} {'tokens/s':>9} {'patches/s':>9} "
          f"{'token fill':>10} {'patch fill':>10} {'samples/row':>11} {'GPU s/row':>9} {'GPUs fed':>8}")
    for r in rows:
        print(f"{r['collator']:9} {r['workers']:>7} {r['rows_per_s']:>7.2f} {r['samples_per_s']:>9.1f} "
              f"{r['tokens_per_s']:>9.0f} {r['patches_per_s']:>9.0f} {r['token_fill']:>10.1%} {r['patch_fill']:>10.1%} "
              f"{r['samples_per_row']:>11.2f} {r['step_s_per_row']:>9.3f} {r['gpus_fed']:>8.2f}")
    packed = [r for r in rows if r["collator"] == "packed"]
    print(f"packed/standard token fill ratio: {np.mean([r['token_fill'] for r in packed]) / rows[0]['token_fill']:.2f}x")
    head = next((r for r in packed if r["workers"] == 1), packed[0])
    headline = (f"loader: {head['workers']} worker(s) feed {head['gpus_fed']:.2f} GPUs "
                f"(3B step at {args.mfu:.0%} MFU, packed)")
    if not args.record:
        print(headline)
        return
    record("loader", headline, budgets=budgets, scale=args.scale, num_images=args.num_images,
           batches=args.batches, mfu=args.mfu, peak_tflops=peak, results=rows)


if __name__ == "__main__":
    main()
