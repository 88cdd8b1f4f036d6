"""The best-fit packer over a buffer and the budget planner on sample sizes alone (the loader's
use of them, with real samples, is in test_data_pipeline.py), and scripts/plan_budgets.py."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bbu_jax.data import convert, synthetic
from bbu_jax.data.budgets import PATCH_STEP, plan_budgets, simulate_packing
from bbu_jax.data.collate import fill_counts, fill_rate, pack_rows

ROOT = Path(__file__).resolve().parents[1]


def field_like_sizes(n: int, seed: int = 0) -> np.ndarray:
    """(tokens, patches) like the field data's: one image, or two with a demonstration (ratio
    0.7), each a phone photo at the pixel limit (2160 or 2304 patches) or a small one, and answers
    of 2..45 objects (long-tailed) at about 40 tokens each."""
    r = np.random.default_rng(seed)
    images = 1 + (r.random(n) < 0.7)
    per_image = r.choice([2160, 2304, 600, 1200], (n, 2), p=[.6, .25, .08, .07])
    patches = np.where(images == 2, per_image.sum(1), per_image[:, 0])
    objects = np.minimum(45, 2 + np.floor(r.lognormal(np.log(7), 0.8, (n, 2)))).astype(int)
    answers = np.where(images == 2, objects.sum(1), objects[:, 0]) * 40
    return np.stack([patches // 4 + 60 * images + answers, patches], 1)


def test_rows_respect_every_budget_and_start_with_the_oldest_sample():
    sizes = field_like_sizes(64)
    L, P, S, B = 8192, 13000, 3, 6
    rows = pack_rows(sizes, rows=B, tokens=L, patches=P, segments=S)
    placed = [k for row in rows for k in row]
    assert len(placed) == len(set(placed)) and len(rows) == B
    for r, row in enumerate(rows):
        assert 1 <= len(row) <= S
        assert (sizes[row].sum(0) <= [L, P]).all()
        # a row starts with the oldest sample still free: everything older is in an earlier row
        earlier = {k for prev in rows[:r] for k in prev}
        assert row[0] not in earlier and all(k in earlier for k in range(row[0]))
    assert pack_rows(sizes, rows=B, tokens=L, patches=P, segments=S) == rows  # deterministic


def test_one_segment_per_row_keeps_stream_order():
    sizes = field_like_sizes(10)
    assert pack_rows(sizes, rows=4, tokens=8192, patches=13000, segments=1) == [[0], [1], [2], [3]]
    assert pack_rows(sizes[:2], rows=4, tokens=8192, patches=13000, segments=1) == [[0], [1]]


def test_planned_budgets_fill_rows_on_field_like_sizes():
    """The plan is made on one draw of the data and holds on another: both budgets >= 95% full,
    against a ratio-blind patch budget with 4 segments per row."""
    plan = plan_budgets(field_like_sizes(600, seed=0), rows=8, tokens=8192, buffer=256, batches=30)
    assert plan.patches % PATCH_STEP == 0 and plan.patches >= field_like_sizes(600)[:, 1].max()
    assert plan.segments >= 2 and plan.stats.max_samples_per_row <= plan.segments
    held_out = simulate_packing(field_like_sizes(600, seed=1), rows=8, tokens=8192, patches=plan.patches,
                                segments=plan.segments, buffer=256)
    assert held_out.token_fill >= 0.95 and held_out.patch_fill >= 0.95, held_out
    blind = simulate_packing(field_like_sizes(600, seed=1), rows=8, tokens=8192, patches=16384, segments=4,
                             buffer=256)
    assert blind.patch_fill < held_out.patch_fill


def test_given_budgets_are_kept_and_a_too_long_sample_is_an_error():
    sizes = field_like_sizes(100)
    plan = plan_budgets(sizes, rows=2, tokens=8192, buffer=32, patches=12800, segments=4)
    assert (plan.tokens, plan.patches, plan.segments) == (8192, 12800, 4)
    assert 0 < plan.stats.min_fill <= 1 and plan.stats.max_samples_per_row <= 4
    with pytest.raises(ValueError, match="tokens > token budget 1000"):
        plan_budgets(sizes, rows=2, tokens=1000, buffer=32)


def test_fill_counts_any_leading_axes_and_batches_without_packing_fields():
    seg = np.array([[[1, 1, 0, 0]], [[1, 2, 2, 0]]])  # (accum, B, L)
    img = np.array([[[1, 0]], [[0, 0]]])
    counts = fill_counts({"segment_ids": seg, "patch_image_ids": img})
    assert counts == {"token_fill": (5, 8), "patch_fill": (1, 4)}
    assert fill_rate({"segment_ids": seg, "patch_image_ids": img}) == (5 / 8, 1 / 4)
    assert fill_counts({"input_ids": seg}) == {}


def test_plan_budgets_script_prints_budgets_and_overrides(tmp_path, tiny_hf_dir):
    """scripts/plan_budgets.py on field-like photos: the run's config with overrides, samples drawn
    as training draws them, the budgets and the overrides that set them."""
    raw, data = tmp_path / "raw", tmp_path / "data"
    synthetic.write_field_dataset(str(raw), 10, seed=0)
    convert.convert_dataset(str(raw), "labelme", str(data), min_pixels=3136, max_pixels=50176, val_ratio=0.0,
                            teacher_pool_size=2, seed=0, language="en", progress=False)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_budgets.py"), "--config",
                          str(ROOT / "configs" / "demo.py"), f"--config.data.train_jsonl={data / 'train.jsonl'}",
                          f"--config.data.teacher_pool_jsonl={data / 'teacher_pool.jsonl'}",
                          f"--config.model.hf_dir={tiny_hf_dir}", "--config.data.token_budget=4096",
                          "--max_samples", "8", "--workers", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("data: 8 samples") and lines[1].startswith("budgets for 2 rows, packing buffer 16:")
    assert re.fullmatch(r"use: --config.data.patch_budget=\d+ --config.data.segments_per_row=\d+", lines[-1])
