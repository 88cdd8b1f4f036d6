"""Batch budgets planned from the data: the patch and segment budgets that, for the configured
rows and token budget, let the packer fill rows with real tokens and patches, not padding.

The jitted step runs its text over every token slot and its vision tower over every patch slot
of a row, so padding costs as much as data. How full rows get depends on the data: how many
patches a sample brings per token (images per sample, their pixel sizes, answer lengths) and how
big samples are against a row. `plan_budgets` measures that with the loader's own packer
(`collate.pack_rows`) on the sizes of samples drawn exactly as training draws them
(`sample_sizes`: the run's seed, shuffle and teacher sampling), and searches the patch budget
that maximizes the smaller of the two fills, then the fewest segments per row that keep it.

Because patch counts come in steps of whole images (a phone photo at the pixel limit is always
about the same number of patches), the fill is not smooth in the patch budget: it jumps where one
more image fits a row. The search therefore scans the patch budget finely around its best coarse
point instead of solving for the mean patches-per-token ratio.
"""
from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from bbu_jax.data.collate import pack_rows
from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.pipeline import DataSpec, train_stream

log = logging.getLogger(__name__)

# Budgets the search tries are multiples of this many patches (16 merged tokens): a whole number of
# the vision tower's merge groups, and round enough for the kernels' tiles.
PATCH_STEP = 64
# A segment budget is cut while the smaller fill loses no more than this (each segment costs the
# detection head a set of queries and memory slots whether it is used or not).
SEGMENT_TOLERANCE = 0.002


@dataclasses.dataclass(frozen=True)
class PackingStats:
    """What the packer makes of the data with one set of budgets (simulated rows)."""
    token_fill: float
    patch_fill: float
    samples_per_row: float
    max_samples_per_row: int

    @property
    def min_fill(self) -> float:
        return min(self.token_fill, self.patch_fill)


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    rows: int
    tokens: int  # L
    patches: int  # P
    segments: int  # S
    buffer: int
    stats: PackingStats


class _Size:
    """An encoded sample -> (tokens, patches); (-1, -1) for a bad one (picklable for workers)."""

    def __call__(self, s) -> np.ndarray:
        return np.array((-1, -1) if isinstance(s, str) else (s.num_tokens, s.num_patches), np.int64)


def sample_sizes(spec: DataSpec, encoder: SampleEncoder, *, seed: int, max_samples: int, workers: int = 0
                 ) -> tuple[np.ndarray, int]:
    """((n, 2) tokens and patches of the first samples of the run's train stream, the number of
    bad samples among them). One epoch, or `max_samples` when that is fewer: each is encoded (with
    its teacher demonstrations) as training will encode it; `workers` grain processes share it."""
    stream, epoch = train_stream(spec, encoder, seed=seed)
    n = min(epoch, max_samples)
    ds = stream[:n].map(_Size()).to_iter_dataset()
    if workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    sizes = np.stack(list(ds))
    bad = sizes[:, 0] < 0
    return sizes[~bad], int(bad.sum())


def simulate_packing(sizes: np.ndarray, *, rows: int, tokens: int, patches: int, segments: int, buffer: int,
                     batches: int = 60) -> PackingStats:
    """Packs `batches` batches of the sample sizes (drawn in order, repeated as the endless train
    stream repeats epochs) as the loader packs them, after the buffer has turned over twice (a
    fresh buffer is an easier mix than the steady one, where the hard samples have gathered)."""
    sizes = np.asarray(sizes, np.int64)
    n, nxt, buffered = len(sizes), 0, []
    warm = True
    used_t = used_p = placed = nrows = most = 0
    while nrows < batches * rows:
        while len(buffered) < buffer:
            buffered.append(nxt % n)
            nxt += 1
        chosen = pack_rows(sizes[buffered], rows=rows, tokens=tokens, patches=patches, segments=segments)
        if not warm:
            for row in chosen:
                t, p = sizes[[buffered[k] for k in row]].sum(0)
                used_t, used_p, placed, most = used_t + t, used_p + p, placed + len(row), max(most, len(row))
            nrows += rows
        warm = warm and nxt < 2 * buffer + rows
        gone = {k for row in chosen for k in row}
        buffered = [i for k, i in enumerate(buffered) if k not in gone]
    return PackingStats(used_t / (nrows * tokens), used_p / (nrows * patches), placed / nrows, most)


def plan_budgets(sizes: np.ndarray, *, rows: int, tokens: int, buffer: int, patches: int | None = None,
                 segments: int | None = None, batches: int = 60) -> BudgetPlan:
    """Patch budget (unless given) maximizing min(token fill, patch fill) for `rows` rows of
    `tokens` tokens, then the fewest segments per row (unless given) that keep that fill."""
    sizes = np.asarray(sizes, np.int64)
    if not len(sizes):
        raise ValueError("no samples to plan budgets from")
    if sizes[:, 0].max() > tokens:
        raise ValueError(f"the longest sample has {sizes[:, 0].max()} tokens > token budget {tokens}: "
                         f"raise the token budget")

    def run(p: int, s: int) -> PackingStats:
        return simulate_packing(sizes, rows=rows, tokens=tokens, patches=p, segments=s, buffer=buffer,
                                batches=batches)

    unlimited = int(tokens // max(1, sizes[:, 0].min())) + 1  # more segments than any row can hold
    cap = segments or unlimited
    if patches is None:
        least = -(-int(sizes[:, 1].max()) // PATCH_STEP) * PATCH_STEP  # the largest sample fits alone
        ratio = tokens * sizes[:, 1].sum() / sizes[:, 0].sum()  # where both budgets run out together
        coarse = sorted({max(least, int(ratio * f) // PATCH_STEP * PATCH_STEP)
                         for f in np.arange(0.85, 1.26, 0.025)})
        scored = [(run(p, cap).min_fill, -p) for p in coarse]
        best = max(range(len(coarse)), key=lambda k: scored[k])
        lo = coarse[best - 1] if best else least - PATCH_STEP
        fine = range(lo + PATCH_STEP, coarse[best] + 1, PATCH_STEP)  # where one more image starts to fit
        patches = max(fine, key=lambda p: (run(p, cap).min_fill, -p))
    stats = run(patches, cap)
    if segments is None:
        segments = stats.max_samples_per_row
        while segments > 1:
            fewer = run(patches, segments - 1)
            if fewer.min_fill < stats.min_fill - SEGMENT_TOLERANCE:
                break
            segments -= 1
        stats = run(patches, segments)
    return BudgetPlan(rows=rows, tokens=tokens, patches=int(patches), segments=int(segments), buffer=buffer,
                      stats=stats)


def plan_for_spec(spec: DataSpec, encoder: SampleEncoder, *, seed: int, max_samples: int, workers: int = 0,
                  patches: int | None = None, segments: int | None = None) -> tuple[BudgetPlan, np.ndarray]:
    """The plan for a run's data spec (its rows, token budget and packing buffer), and the sample
    sizes it was made from."""
    sizes, bad = sample_sizes(spec, encoder, seed=seed, max_samples=max_samples, workers=workers)
    if bad:
        log.warning("%d of %d drawn samples were bad and left out of the plan", bad, bad + len(sizes))
    plan = plan_budgets(sizes, rows=spec.batch_rows, tokens=spec.token_budget, buffer=spec.pack_buffer,
                        patches=patches, segments=segments)
    return plan, sizes


def describe(plan: BudgetPlan, sizes: np.ndarray) -> str:
    """The plan as the lines plan_budgets.py prints: data, budgets with their fill, how to use them."""
    t, p = sizes[:, 0], sizes[:, 1]
    s = plan.stats
    return "\n".join([
        f"data: {len(sizes)} samples, tokens {t.min()}..{t.max()} (mean {t.mean():.0f}), patches "
        f"{p.min()}..{p.max()} (mean {p.mean():.0f}), {p.sum() / t.sum():.2f} patches per token",
        f"budgets for {plan.rows} rows, packing buffer {plan.buffer}: token_budget={plan.tokens} "
        f"patch_budget={plan.patches} segments_per_row={plan.segments}",
        f"simulated fill: tokens {s.token_fill:.1%}, patches {s.patch_fill:.1%}, {s.samples_per_row:.2f} "
        f"samples per row (at most {s.max_samples_per_row})",
        f"use: --config.data.patch_budget={plan.patches} --config.data.segments_per_row={plan.segments}",
    ])
