"""Loader throughput and fill rate over the synthetic BBU dataset.

Measures tokens/s and batches/s of the packed loader with 0, 1, 2 grain workers (the first batch,
which includes worker start-up and tokenizer loading, is excluded), and the fill rate (non-padding
tokens and patches) of packed vs standard batches with the same budgets. Uses the tiny test
tokenizer (bbu_jax.testing.tiny_hf), whose text is longer per character than Qwen's.

  python benchmarks/loader.py [--num_images 300] [--batches 40] [--workers 0 1 2]

Prints a table; the last line is `loader: packed_fill = X%`; appends a JSON record to
benchmarks/results.jsonl.
"""
import argparse
import dataclasses
import datetime
import json
import os
import tempfile
import time

import numpy as np

from bbu_jax.data.batch import check_batch
from bbu_jax.data.collate import Budgets, fill_rate
from bbu_jax.data.convert import convert_dataset
from bbu_jax.data.pipeline import make_train_iterator
from bbu_jax.data.synthetic import write_labelme_dataset
from bbu_jax.testing.tiny_hf import write_tiny_qwen2_5_vl

HERE = os.path.dirname(os.path.abspath(__file__))


def run(data, model, budgets, collator, workers, batches, args):
    it = make_train_iterator(os.path.join(data, "train.jsonl"), os.path.join(data, "teacher_pool.jsonl"), model,
                             budgets, collator=collator, teacher_ratio=args.teacher_ratio, max_teachers=2,
                             min_pixels=args.min_pixels, max_pixels=args.max_pixels, language="en", seed=0,
                             num_workers=workers)
    check_batch(next(it), budgets.dims())  # start-up excluded
    tokens = patches = 0
    fills = []
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        tokens += int((b["segment_ids"] > 0).sum())
        patches += int((b["patch_image_ids"] > 0).sum())
        fills.append(fill_rate(b))
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    f = np.mean(fills, 0)
    return {"collator": collator, "workers": workers, "batches_per_s": batches / dt, "tokens_per_s": tokens / dt,
            "patches_per_s": patches / dt, "token_fill": float(f[0]), "patch_fill": float(f[1]),
            "segments_per_row": None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=300)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--min_pixels", type=int, default=3136)
    p.add_argument("--max_pixels", type=int, default=200704)
    p.add_argument("--teacher_ratio", type=float, default=0.7)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=3584)  # ~ the data's tokens:patches ratio
    p.add_argument("--patches", type=int, default=4096)
    p.add_argument("--segments", type=int, default=8)
    args = p.parse_args()
    budgets = Budgets(rows=args.rows, tokens=args.tokens, patches=args.patches, segments=args.segments,
                      objects=16, caption_tokens=48, vision_memory=256, text_memory=64)
    with tempfile.TemporaryDirectory() as tmp:
        raw, data = os.path.join(tmp, "raw"), os.path.join(tmp, "data")
        write_labelme_dataset(raw, args.num_images, seed=0)
        convert_dataset(raw, "labelme", data, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                        val_ratio=0.1, teacher_pool_size=8, seed=0, language="en", progress=False)
        model = str(write_tiny_qwen2_5_vl(os.path.join(tmp, "tiny")))
        rows = [run(data, model, budgets, "standard", 0, args.batches, args)]
        rows += [run(data, model, budgets, "packed", w, args.batches, args) for w in args.workers]
    print(f"budgets: {dataclasses.asdict(budgets)}; cpus: {os.cpu_count()}")
    print(f"{'collator':9} {'workers':>7} {'batches/s':>10} {'tokens/s':>10} {'patches/s':>10} {'token fill':>10} {'patch fill':>10}")
    for r in rows:
        print(f"{r['collator']:9} {r['workers']:>7} {r['batches_per_s']:>10.2f} {r['tokens_per_s']:>10.0f} "
              f"{r['patches_per_s']:>10.0f} {r['token_fill']:>10.1%} {r['patch_fill']:>10.1%}")
    packed = [r for r in rows if r["collator"] == "packed"]
    packed_fill = float(np.mean([r["token_fill"] for r in packed]))
    std_fill = rows[0]["token_fill"]
    print(f"packed/standard token fill ratio: {packed_fill / std_fill:.2f}x")
    record = {"benchmark": "loader", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "cpus": os.cpu_count(), "budgets": dataclasses.asdict(budgets), "args": vars(args),
              "results": rows, "packed_token_fill": packed_fill, "standard_token_fill": std_fill}
    with open(os.path.join(HERE, "results.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"loader: packed_fill = {100 * packed_fill:.1f}%")


if __name__ == "__main__":
    main()
