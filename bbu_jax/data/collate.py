"""Budgets, best-fit row packing and collation into the fixed-shape batch of batch.py.

A row holds whole samples (segments 1..S); a sample is never split. `pack_rows` chooses from a
buffer of samples which ones fill the B rows of the batch being built (token, patch and segment
budgets); the standard collator is the same packer with one sample per row, so both give
identical shapes. A sample that fits no budget even alone is reported by `budget_problem` (the
pipeline raises or skips-and-counts it): nothing is ever truncated.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bbu_jax.data.batch import PATCH_PIXELS
from bbu_jax.data.encode import EncodedSample


@dataclasses.dataclass(frozen=True)
class Budgets:
    rows: int  # B
    tokens: int  # L
    patches: int  # P (multiple of 4)
    segments: int  # S
    objects: int  # M
    caption_tokens: int  # C
    vision_memory: int  # NV
    text_memory: int  # NT

    def __post_init__(self):
        if min(dataclasses.astuple(self)) < 1:
            raise ValueError(f"every budget must be >= 1: {self}")
        if self.patches % 4:
            raise ValueError(f"patches budget {self.patches} must be a multiple of 4")

    def dims(self) -> dict[str, int]:
        """The dims dict of batch.check_batch."""
        return {"B": self.rows, "L": self.tokens, "P": self.patches, "S": self.segments, "M": self.objects,
                "C": self.caption_tokens, "NV": self.vision_memory, "NT": self.text_memory}


def budget_problem(s: EncodedSample, b: Budgets) -> str | None:
    """Why this sample can never fit a row (None if it can)."""
    caption = max((len(c) for c in s.gt_caption_ids), default=0)
    checks = [("tokens", s.num_tokens, b.tokens), ("patches", s.num_patches, b.patches),
              ("objects", len(s.gt_caption_ids), b.objects), ("caption_tokens", caption, b.caption_tokens),
              ("vision_memory", len(s.det_vision_index), b.vision_memory),
              ("text_memory", len(s.det_text_index), b.text_memory)]
    bad = [f"{name} {need} > budget {have}" for name, need, have in checks if need > have]
    return f"{s.meta['source']}: sample fits no row ({', '.join(bad)})" if bad else None


def pack_rows(sizes: np.ndarray, *, rows: int, tokens: int, patches: int, segments: int) -> list[list[int]]:
    """Which buffered samples fill the `rows` rows of one batch: per row, positions into `sizes`.

    sizes: (K, 2) (tokens, patches) of the buffered samples, oldest first; each fits a row alone
    (budget_problem). Every row starts with the oldest sample not yet placed, so no sample waits
    more than about K / rows batches. While a sample fits, the row then takes the one that, with
    the best single sample after it, fills most of the row (best fit with a one-sample lookahead:
    plain best fit closes rows on gaps that two smaller samples would fill). Fill counts both
    budgets, each as a share of the row (t / L + p / P), in integers so the choice is exact
    everywhere. With one segment per row the rows simply take the oldest samples in order.
    """
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    value = sizes[:, 0] * patches + sizes[:, 1] * tokens
    free = np.ones(len(sizes), bool)
    out = []
    for _ in range(rows):
        left = np.flatnonzero(free)
        if not len(left):
            break
        row = [int(left[0])]
        free[left[0]] = False
        room = np.array([tokens, patches], np.int64) - sizes[left[0]]
        while len(row) < segments:
            cand = np.flatnonzero(free & (sizes <= room).all(1))
            if not len(cand):
                break
            score = value[cand]
            if len(row) + 1 < segments:  # room for one more after this one: add the best follower
                t, p = sizes[cand, 0], sizes[cand, 1]
                fits = (t[None, :] <= (room[0] - t)[:, None]) & (p[None, :] <= (room[1] - p)[:, None])
                np.fill_diagonal(fits, False)
                score = score + (fits * score[None, :]).max(1)
            pick = int(cand[int(np.argmax(score))])  # ties: the oldest
            row.append(pick)
            free[pick] = False
            room -= sizes[pick]
        out.append(row)
    return out


def empty_batch(b: Budgets) -> dict[str, np.ndarray]:
    B, L, P, S, M, C = b.rows, b.tokens, b.patches, b.segments, b.objects, b.caption_tokens
    return {
        "input_ids": np.zeros((B, L), np.int32),
        "positions": np.zeros((B, 3, L), np.int32),
        "segment_ids": np.zeros((B, L), np.int32),
        "targets": np.zeros((B, L), np.int32),
        "target_kind": np.zeros((B, L), np.int8),
        "patches": np.zeros((B, P, PATCH_PIXELS), np.uint8),
        "patch_pos": np.zeros((B, P, 2), np.int32),
        "patch_window_ids": np.zeros((B, P), np.int32),
        "patch_image_ids": np.zeros((B, P), np.int32),
        "vision_token_index": np.full((B, L), -1, np.int32),
        "det_vision_index": np.zeros((B, S, b.vision_memory), np.int32),
        "det_vision_mask": np.zeros((B, S, b.vision_memory), np.bool_),
        "det_vision_pos": np.zeros((B, S, b.vision_memory, 2), np.float32),
        "det_text_index": np.zeros((B, S, b.text_memory), np.int32),
        "det_text_mask": np.zeros((B, S, b.text_memory), np.bool_),
        "gt_boxes": np.zeros((B, S, M, 4), np.float32),
        "gt_valid": np.zeros((B, S, M), np.bool_),
        "gt_caption_ids": np.zeros((B, S, M, C), np.int32),
        "gt_caption_mask": np.zeros((B, S, M, C), np.bool_),
        "segment_valid": np.zeros((B, S), np.bool_),
    }


def collate(rows: Sequence[Sequence[EncodedSample]], b: Budgets) -> tuple[dict[str, np.ndarray], list[list[dict]]]:
    """Rows of samples -> (batch dict of batch.py, per row the meta of each segment).

    Offsets: tokens by the row's token count so far, patches/merged tokens by its patch count,
    window and image ids by the ids used so far, so they stay unique within the row.
    """
    out = empty_batch(b)
    metas = []
    for r, samples in enumerate(rows):
        t0 = p0 = w0 = i0 = 0
        row_meta = []
        for k, s in enumerate(samples):
            n, p = s.num_tokens, s.num_patches
            t = slice(t0, t0 + n)
            out["input_ids"][r, t] = s.input_ids
            out["positions"][r, :, t] = s.positions
            out["segment_ids"][r, t] = k + 1
            out["targets"][r, t] = s.targets
            out["target_kind"][r, t] = s.target_kind
            out["vision_token_index"][r, t] = np.where(s.vision_token_index >= 0, s.vision_token_index + p0 // 4, -1)
            q = slice(p0, p0 + p)
            out["patches"][r, q] = s.patches
            out["patch_pos"][r, q] = s.patch_pos
            out["patch_window_ids"][r, q] = s.patch_window_ids + w0
            out["patch_image_ids"][r, q] = s.patch_image_ids + i0
            nv, nt, m = len(s.det_vision_index), len(s.det_text_index), len(s.gt_caption_ids)
            out["det_vision_index"][r, k, :nv] = s.det_vision_index + t0
            out["det_vision_mask"][r, k, :nv] = True
            out["det_vision_pos"][r, k, :nv] = s.det_vision_pos
            out["det_text_index"][r, k, :nt] = s.det_text_index + t0
            out["det_text_mask"][r, k, :nt] = True
            out["gt_boxes"][r, k, :m] = s.gt_boxes
            out["gt_valid"][r, k, :m] = True
            for j, cap in enumerate(s.gt_caption_ids):
                out["gt_caption_ids"][r, k, j, :len(cap)] = cap
                out["gt_caption_mask"][r, k, j, :len(cap)] = True
            out["segment_valid"][r, k] = True
            if p:
                w0, i0 = int(s.patch_window_ids.max()) + w0, int(s.patch_image_ids.max()) + i0
            t0, p0 = t0 + n, p0 + p
            row_meta.append(dict(s.meta, row=r, segment=k + 1))
        metas.append(row_meta)
    return out, metas


# fill name -> the field whose non-zero entries are real work (0 marks padding)
FILLS = {"token_fill": "segment_ids", "patch_fill": "patch_image_ids"}


def fill_counts(batch: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """(real, all) token and patch slots of a batch (any leading axes), as the training log's
    sum/count pairs: train/token_fill and train/patch_fill over a logging interval. A batch
    without those fields (a test's toy task) has no fill."""
    return {name: (int((np.asarray(batch[key]) > 0).sum()), np.asarray(batch[key]).size)
            for name, key in FILLS.items() if key in batch}


def fill_rate(batch: dict[str, np.ndarray]) -> tuple[float, float]:
    """Fraction of non-padding tokens and patches."""
    (t, tn), (p, pn) = fill_counts(batch).values()
    return t / tn, p / pn
