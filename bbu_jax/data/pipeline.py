"""grain pipelines: seeded, deterministic, checkpointable packed/standard batches.

Train stream (per host shard): record indices -> seeded shuffle, reshuffled each epoch, repeated
forever -> `random_map` that samples teachers and encodes (grain seeds it per element, so element
k of the stream is a pure function of (seed, k)) -> `PackedBatchDataset`, our batch-level
best-fit packer -> optional `mp_prefetch` workers (each packs every num_workers-th element).

Packing: the packer holds a buffer of `buffer` samples (stream order); each batch tops it up
from the stream, then `collate.pack_rows` fills the B rows from it (each row starts with the
oldest sample, so none starves) and the samples left wait in the buffer for the next batch. A
buffer of a few hundred samples leaves the rows almost no gap that no sample fits (see
benchmarks/packing.py). Because a stream element is a pure function of its index, the iterator
state stays small and exact: {"next": next stream index, "carry": buffered indices, "skipped":
count}. Restoring it (directly, or through grain's checkpoint handler / orbax, also with
workers) replays the same batches; the buffered samples are encoded again. Batches are
identical for the same (seed, num_workers, budgets, buffer); a different worker count changes
which samples share a batch.

Bad samples (unreadable image, bad box, a sample that fits no budget) raise ValueError naming
FILE:LINE, or are skipped, logged and counted when skip_bad_samples.

Yields: train -> batch dicts of batch.FIELDS (pass check_batch); eval -> (batch, metas) where
metas[row] lists per segment {id, source, image, resized_hw, stored_hw, orig_size, num_teachers,
row, segment}; eval is one pass in file order, one sample per row, the last batch padded with
empty rows (segment_valid False).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grain
from absl import flags
import numpy as np

from bbu_jax.data.collate import Budgets, budget_problem, collate, pack_rows
from bbu_jax.data.encode import EncodedSample, SampleEncoder, choose_teachers
from bbu_jax.data.schema import Example, Record, RecordError, load_records
from bbu_jax.models.qwen2_5_vl.processing import ImageInput

log = logging.getLogger(__name__)
COLLATORS = ("packed", "standard")


class EncodeRecord:
    """(record index, rng) -> EncodedSample, or the error string of a bad record."""

    def __init__(self, records: Sequence[Record], pool: Sequence[Example], encoder: SampleEncoder,
                 teacher_ratio: float, max_teachers: int):
        self.records, self.pool, self.encoder = list(records), list(pool), encoder
        self.teacher_ratio, self.max_teachers = teacher_ratio, max_teachers

    def __call__(self, index: int, rng: np.random.Generator) -> EncodedSample | str:
        rec = self.records[int(index)]
        try:
            teachers = choose_teachers(rec, self.pool, rng, self.teacher_ratio, self.max_teachers)
            return self.encoder.encode(rec.student, teachers, source=rec.source, record_id=rec.id,
                                       orig_size=rec.orig_size)
        except RecordError as e:
            return str(e)


class PackedBatchDataset(grain.IterDataset):
    """Batches of whole samples packed best-fit from a random-access stream (see module doc)."""

    def __init__(self, stream: grain.MapDataset, budgets: Budgets, *, segments_per_row: int,
                 buffer: int, skip_bad_samples: bool, with_meta: bool, epoch_size: int):
        super().__init__(stream)
        self.epoch_size = epoch_size  # a whole epoch of skipped samples in a row means no good data
        self.budgets = budgets
        self.buffer = max(buffer, budgets.rows)  # fewer would leave rows empty while samples wait
        self.segments_per_row = min(segments_per_row, budgets.segments)
        self.skip_bad_samples, self.with_meta = skip_bad_samples, with_meta

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain's mp_prefetch gives each worker a slice of the stream."""
        self._parents = (self._parent.slice(sl),)

    def __iter__(self) -> "PackedBatchIterator":
        return PackedBatchIterator(self)


class PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, ds: PackedBatchDataset):
        super().__init__()
        self._ds, self._stream = ds, ds._parent
        self._next, self._carry, self._skipped, self._skipped_in_a_row = 0, [], 0, 0
        self._cache: dict[int, EncodedSample] = {}

    def _get(self, index: int) -> EncodedSample | None:
        if index not in self._cache:
            s = self._stream[index]
            if not isinstance(s, str):
                problem = budget_problem(s, self._ds.budgets)
                s = problem if problem else s
            if isinstance(s, str):
                if not self._ds.skip_bad_samples:
                    raise ValueError(s)
                self._skipped += 1
                self._skipped_in_a_row += 1
                if self._skipped_in_a_row >= self._ds.epoch_size:
                    raise ValueError(f"{self._skipped_in_a_row} samples in a row were bad, the last: {s}")
                log.warning("skipped bad sample (%d so far): %s", self._skipped, s)
                return None
            self._cache[index] = s
            self._skipped_in_a_row = 0
        return self._cache[index]

    def __next__(self):
        ds, b = self._ds, self._ds.budgets
        # encoded again after a restore (a file that went bad since is skipped or raises as any)
        buffered = [i for i in self._carry if self._get(i) is not None]
        while len(buffered) < ds.buffer and self._next < len(self._stream):
            index = self._next
            self._next += 1
            if self._get(index) is not None:
                buffered.append(index)
        if not buffered:
            raise StopIteration
        samples = [self._cache[i] for i in buffered]
        sizes = np.array([(s.num_tokens, s.num_patches) for s in samples], np.int64)
        rows = pack_rows(sizes, rows=b.rows, tokens=b.tokens, patches=b.patches, segments=ds.segments_per_row)
        placed = {k for row in rows for k in row}
        self._carry = [i for k, i in enumerate(buffered) if k not in placed]
        self._cache = {i: self._cache[i] for i in self._carry}
        batch, metas = collate([[samples[k] for k in row] for row in rows], b)
        return (batch, metas) if ds.with_meta else batch

    def get_state(self) -> dict[str, Any]:
        return {"next": self._next, "carry": list(self._carry), "skipped": self._skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._next, self._carry = int(state["next"]), [int(i) for i in state["carry"]]
        self._skipped = int(state["skipped"])
        self._cache = {}


def _stream(records, pool, encoder, *, teacher_ratio, max_teachers, seed, shuffle: bool,
            repeat: bool) -> grain.MapDataset:
    ds = grain.MapDataset.range(len(records))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    return ds.random_map(EncodeRecord(records, pool, encoder, teacher_ratio, max_teachers), seed=seed)


def _load(path: str | None, skip_bad_samples: bool) -> list[Record]:
    if not path:
        return []
    records, errors = load_records(path, skip_bad_samples=skip_bad_samples)
    for e in errors:
        log.warning("skipped bad record: %s", e)
    return records


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data group of the config: files, teacher sampling, image limits and batch budgets."""
    train_jsonl: str
    val_jsonl: str  # "" = no validation
    teacher_pool_jsonl: str  # "" = no teacher demonstrations
    teacher_ratio: float
    max_teachers: int
    language: str
    collator: str  # one of COLLATORS
    min_pixels: int
    max_pixels: int
    skip_bad_samples: bool
    workers: int
    check_budgets_on_start: bool
    batch_rows: int  # global rows per micro-step
    token_budget: int
    patch_budget: int
    segments_per_row: int
    pack_buffer: int  # samples the packed collator chooses rows from (held encoded, per worker)
    max_objects: int
    caption_tokens: int
    vision_memory_tokens: int
    text_memory_tokens: int

    def budgets(self, *, rows: int, segments: int) -> Budgets:
        return Budgets(rows=rows, tokens=self.token_budget, patches=self.patch_budget, segments=segments,
                       objects=self.max_objects, caption_tokens=self.caption_tokens,
                       vision_memory=self.vision_memory_tokens, text_memory=self.text_memory_tokens)

    def samples_per_row(self) -> int:
        """At most this many samples share a row (the packed collator's segments)."""
        return self.segments_per_row if self.collator == "packed" else 1


def train_stream(spec: DataSpec, encoder: SampleEncoder, *, seed: int, shard_index: int = 0,
                 shard_count: int = 1) -> tuple[grain.MapDataset, int]:
    """(this host's endless stream of encoded samples (EncodedSample, or the error string of a bad
    one) in training order with the run's teacher sampling, records per epoch)."""
    records = _load(spec.train_jsonl, spec.skip_bad_samples)[shard_index::shard_count]
    if not records:
        raise ValueError(f"{spec.train_jsonl}: no records for shard {shard_index}/{shard_count}")
    pool = [r.student for r in _load(spec.teacher_pool_jsonl or None, spec.skip_bad_samples)]
    stream = _stream(records, pool, encoder, teacher_ratio=spec.teacher_ratio, max_teachers=spec.max_teachers,
                     seed=seed, shuffle=True, repeat=True)
    return stream, len(records)


def make_train_iterator(spec: DataSpec, encoder: SampleEncoder, *, seed: int, shard_index: int = 0,
                        shard_count: int = 1) -> grain.DatasetIterator:
    """Endless training batches for this host's shard (records shard_index::shard_count; its
    spec.batch_rows // shard_count rows per batch)."""
    if spec.collator not in COLLATORS:
        raise ValueError(f"collator must be one of {COLLATORS}, got {spec.collator!r}")
    stream, epoch_size = train_stream(spec, encoder, seed=seed, shard_index=shard_index, shard_count=shard_count)
    budgets = spec.budgets(rows=spec.batch_rows // shard_count, segments=spec.segments_per_row)
    packed = spec.collator == "packed"
    ds = PackedBatchDataset(stream, budgets, segments_per_row=spec.samples_per_row(),
                            buffer=spec.pack_buffer if packed else budgets.rows,
                            skip_bad_samples=spec.skip_bad_samples, with_meta=False, epoch_size=epoch_size)
    if spec.workers > 0:
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside absl.app nobody parsed them
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.workers))
    return iter(ds)


def make_eval_batches(jsonl: str, encoder: SampleEncoder, budgets: Budgets, *,
                      teacher_pool: str | None = None, teacher_ratio: float = 0.0, max_teachers: int = 0,
                      seed: int = 0, skip_bad_samples: bool = False, max_samples: int | None = None
                      ) -> Iterator[tuple[dict[str, np.ndarray], list[list[dict]]]]:
    """One deterministic pass, file order, one sample per row: (batch, metas) pairs, of the first
    ``max_samples`` usable records (default: all)."""
    records = _load(jsonl, skip_bad_samples)[:max_samples]
    pool = [r.student for r in _load(teacher_pool, skip_bad_samples)]
    stream = _stream(records, pool, encoder, teacher_ratio=teacher_ratio, max_teachers=max_teachers,
                     seed=seed, shuffle=False, repeat=False)
    return iter(PackedBatchDataset(stream, budgets, segments_per_row=1, buffer=budgets.rows,
                                   skip_bad_samples=skip_bad_samples, with_meta=True,
                                   epoch_size=max(1, len(records))))


def build_inference_inputs(encoder: SampleEncoder, student_images: Sequence[ImageInput],
                           teachers: Sequence[Example] = (), *, source: str = "<inference>"
                           ) -> tuple[dict[str, np.ndarray], dict]:
    """Model inputs for ONE student (+ demonstrations), ending in the generation prompt.

    Returns (batch, info): batch has the batch.FIELDS layout with B=1, S=1 and budgets equal to
    the exact sizes (no padding; gt_* fields are empty with M=1); info holds rope_delta (what
    decoding adds to positions) and the student's resized/stored image sizes.
    """
    student = Example(tuple(student_images), ())
    s = encoder.encode(student, teachers, source=source, record_id=source, with_answer=False)
    b = Budgets(rows=1, tokens=s.num_tokens, patches=max(4, s.num_patches), segments=1, objects=1,
                caption_tokens=1, vision_memory=max(1, len(s.det_vision_index)),
                text_memory=max(1, len(s.det_text_index)))
    batch, metas = collate([[s]], b)
    return batch, dict(metas[0][0], rope_delta=s.rope_delta, budgets=b)
