"""Packing: how much of every training row is real work (tokens and patches that are not padding).

The jitted step runs its text over every token slot and its vision tower over every patch slot,
so padding costs as much as data. This plans the budgets for the given data
(``bbu_jax.data.budgets``: the packer simulated on samples drawn as training draws them) unless
``--token_budget/--patch_budget/--segments_per_row`` are given, then draws ``--batches`` batches
through the real train iterator (``make_train_iterator``, the run's seed, teacher sampling and
packing buffer) and prints the fill of each batch, samples per row and the padding by cause.
Baselines in the same run: one sample per row (the standard collator, same budgets) and the
config's own budgets when they differ from the planned ones.

Padding by cause, per row: "segments" (the row holds S samples), "tokens" (its token room is
below the shortest sample's), "patches" (its patch room is below the smallest sample's), "fit"
(the rest: no buffered sample fitted both rooms at once).

  python benchmarks/packing.py --train_jsonl TRAIN --teacher_pool POOL --hf_dir HF --config configs/base.py
  python benchmarks/packing.py --field_photos 600 --config configs/base.py   # field-like data, made here

``--field_photos N`` makes N field-like photos (``bbu_jax.data.synthetic.write_field_dataset``:
phone aspects, 2..45 objects, zh descs) converted at the config's pixel limits with a teacher
pool, in a temporary folder; without ``--hf_dir`` the tokenizer is the tiny test one
(``bbu_jax.workflows.tiny_model``), whose zh text runs longer than Qwen's.

Last line: `packing: token fill X%, patch fill Y% (budgets L tokens, P patches, S segments per
row)`; appends a JSON record to benchmarks/results.jsonl.
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

from benchmarks._common import BASE_CONFIG, record, run_specs  # noqa: E402
from bbu_jax.data.batch import check_batch  # noqa: E402
from bbu_jax.data.budgets import describe, plan_budgets, sample_sizes  # noqa: E402
from bbu_jax.data.convert import convert_dataset  # noqa: E402
from bbu_jax.data.pipeline import make_train_iterator  # noqa: E402
from bbu_jax.data.synthetic import write_field_dataset  # noqa: E402
from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl  # noqa: E402
from bbu_jax.workflows.train import make_encoder  # noqa: E402

CAUSES = ("segments", "tokens", "patches", "fit")


def measure(specs, encoder, batches: int, smallest: tuple[int, int], samples_per_row: float) -> dict:
    """Fill of each batch of the run's train iterator with ``specs.data``'s budgets, samples per row
    and the padding by cause (share of all slots), once each worker's packing buffer has turned
    over twice (at about ``samples_per_row``): a fresh buffer is an easier mix than the steady one,
    where the hard samples have gathered."""
    d = specs.data
    b = d.budgets(rows=d.batch_rows, segments=d.segments_per_row)
    it = make_train_iterator(d, encoder, seed=specs.run.seed)
    buffer = d.pack_buffer if d.collator == "packed" else b.rows
    warmup = int(np.ceil(2 * buffer * max(1, d.workers) / (b.rows * samples_per_row)))
    for _ in range(warmup):
        next(it)
    per_batch, waste = [], {c: np.zeros(2) for c in CAUSES}
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        check_batch(batch, b.dims())
        tokens = (batch["segment_ids"] > 0).sum(1)
        patches = (batch["patch_image_ids"] > 0).sum(1)
        samples = batch["segment_valid"].sum(1)
        for t, p, n in zip(tokens, patches, samples):
            room = np.array([b.tokens - t, b.patches - p])
            cause = ("segments" if n >= b.segments else "tokens" if room[0] < smallest[0]
                     else "patches" if room[1] < smallest[1] else "fit")
            waste[cause] += room
        per_batch.append((tokens.sum() / (b.rows * b.tokens), patches.sum() / (b.rows * b.patches),
                          samples.sum() / b.rows))
    seconds = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    fills = np.array(per_batch)
    slots = np.array([batches * b.rows * b.tokens, batches * b.rows * b.patches])
    return {"budgets": {"tokens": b.tokens, "patches": b.patches, "segments": b.segments, "rows": b.rows,
                        "buffer": buffer}, "warmup_batches": warmup,
            "token_fill": float(fills[:, 0].mean()), "patch_fill": float(fills[:, 1].mean()),
            "min_token_fill": float(fills[:, 0].min()), "min_patch_fill": float(fills[:, 1].min()),
            "samples_per_row": float(fills[:, 2].mean()), "batches_per_s": batches / seconds,
            "per_batch": fills.round(4).tolist(),
            "waste": {c: (waste[c] / slots).round(4).tolist() for c in CAUSES}}


def with_budgets(specs, tokens: int, patches: int, segments: int, collator: str = "packed"):
    return dataclasses.replace(specs, data=dataclasses.replace(
        specs.data, token_budget=tokens, patch_budget=patches, segments_per_row=segments, collator=collator))


def print_run(name: str, r: dict) -> None:
    b = r["budgets"]
    print(f"\n{name}: {b['rows']} rows x {b['tokens']} tokens / {b['patches']} patches, {b['segments']} segments "
          f"per row, packing buffer {b['buffer']}; {r['warmup_batches']} warm-up batches not counted")
    print(f"{'batch':>5} {'token fill':>10} {'patch fill':>10} {'samples/row':>11}")
    for k, (t, p, s) in enumerate(r["per_batch"]):
        print(f"{k:>5} {t:>10.1%} {p:>10.1%} {s:>11.2f}")
    print(f"{'mean':>5} {r['token_fill']:>10.1%} {r['patch_fill']:>10.1%} {r['samples_per_row']:>11.2f}")
    print(f"{'min':>5} {r['min_token_fill']:>10.1%} {r['min_patch_fill']:>10.1%}")
    print("padding by cause (share of all token / patch slots): " + ", ".join(
        f"{c} {w[0]:.1%} / {w[1]:.1%}" for c, w in r["waste"].items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(BASE_CONFIG), help="the run's config file (its data settings)")
    p.add_argument("--train_jsonl", default=None)
    p.add_argument("--teacher_pool", default=None, help="teacher pool JSONL (default: the config's)")
    p.add_argument("--hf_dir", default=None, help="model folder with the tokenizer (default: the tiny test one)")
    p.add_argument("--field_photos", type=int, default=0, help="make this many field-like photos as the data")
    p.add_argument("--token_budget", type=int, default=None, help="default: the config's")
    p.add_argument("--patch_budget", type=int, default=None, help="default: planned")
    p.add_argument("--segments_per_row", type=int, default=None, help="default: planned")
    p.add_argument("--pack_buffer", type=int, default=None, help="default: the config's")
    p.add_argument("--batches", type=int, default=50, help="batches drawn through the train iterator")
    p.add_argument("--plan_samples", type=int, default=1000, help="samples drawn to plan from (at most an epoch)")
    p.add_argument("--workers", type=int, default=0, help="grain workers for drawing (0: this process)")
    p.add_argument("--no-record", dest="record", action="store_false")
    args = p.parse_args()
    if not args.train_jsonl and not args.field_photos:
        p.error("give --train_jsonl (and --teacher_pool), or --field_photos N")
    specs = run_specs(args.config)
    d = specs.data
    with tempfile.TemporaryDirectory() as tmp:
        train, pool = args.train_jsonl, args.teacher_pool if args.teacher_pool is not None else d.teacher_pool_jsonl
        if not train:
            raw, data = os.path.join(tmp, "raw"), os.path.join(tmp, "data")
            write_field_dataset(raw, args.field_photos, seed=0)
            convert_dataset(raw, "labelme", data, min_pixels=d.min_pixels, max_pixels=d.max_pixels, val_ratio=0.05,
                            teacher_pool_size=max(1, args.field_photos // 10), seed=0, language=d.language,
                            progress=False)
            train, pool = os.path.join(data, "train.jsonl"), os.path.join(data, "teacher_pool.jsonl")
        hf_dir = args.hf_dir or str(write_tiny_qwen2_5_vl(os.path.join(tmp, "tiny")))
        specs = dataclasses.replace(
            specs, model=dataclasses.replace(specs.model, hf_dir=hf_dir),
            data=dataclasses.replace(d, train_jsonl=train, teacher_pool_jsonl=pool, workers=args.workers,
                                     token_budget=args.token_budget or d.token_budget,
                                     pack_buffer=args.pack_buffer or d.pack_buffer))
        d = specs.data
        encoder = make_encoder(specs)
        sizes, bad = sample_sizes(d, encoder, seed=specs.run.seed, max_samples=args.plan_samples,
                                  workers=args.workers)
        plan = plan_budgets(sizes, rows=d.batch_rows, tokens=d.token_budget, buffer=d.pack_buffer,
                            patches=args.patch_budget, segments=args.segments_per_row)
        print(f"config {args.config}; data {train} + pool {pool or '(none)'}; {bad} bad samples left out")
        print(describe(plan, sizes))
        smallest = (int(sizes[:, 0].min()), int(sizes[:, 1].min()))
        spr = plan.stats.samples_per_row
        runs = {"planned": measure(with_budgets(specs, plan.tokens, plan.patches, plan.segments), encoder,
                                   args.batches, smallest, spr)}
        runs["one sample per row"] = measure(with_budgets(specs, plan.tokens, plan.patches, 1, "standard"),
                                             encoder, args.batches, smallest, 1.0)
        config_budgets = (d.token_budget, d.patch_budget, d.segments_per_row)
        if config_budgets != (plan.tokens, plan.patches, plan.segments):
            runs["config"] = measure(with_budgets(specs, *config_budgets), encoder, args.batches, smallest, spr)
    for name, r in runs.items():
        print_run(name, r)
    r = runs["planned"]
    print()
    for name, c in list(runs.items())[1:]:
        print(f"planned / {name}: token fill {r['token_fill'] / c['token_fill']:.2f}x, patch fill "
              f"{r['patch_fill'] / c['patch_fill']:.2f}x")
    b = r["budgets"]
    headline = (f"packing: token fill {r['token_fill']:.1%}, patch fill {r['patch_fill']:.1%} "
                f"(budgets {b['tokens']} tokens, {b['patches']} patches, {b['segments']} segments per row)")
    if not args.record:
        print(headline)
        return
    record("packing", headline, config=args.config, data=args.train_jsonl or f"{args.field_photos} field photos",
           plan_samples=len(sizes), plan_fill=dataclasses.asdict(plan.stats), batches=args.batches,
           workers=args.workers, results=runs)


if __name__ == "__main__":
    main()
