"""Checks of the data against the specs, run before any compile: a run never dies hours in on a
bad line, a sample that cannot fit, or data converted for other pixel limits. What the run's
loaders will read (train, val and teacher-pool lines), they read here first, under the same
skip_bad_samples rule: a bad line is an error naming FILE:LINE, or a logged and counted skip."""
from __future__ import annotations

import json
import logging
import os

from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.schema import Example, Record, RecordError, load_records
from bbu_jax.foundation.files import prepare_out_dir
from bbu_jax.workflows.config import Specs, validate_budgets

log = logging.getLogger(__name__)

# The data spec's files, each with what it is called in messages.
FILES = (("train_jsonl", "train"), ("val_jsonl", "val"), ("teacher_pool_jsonl", "teacher pool"))


def check_data(specs: Specs, encoder: SampleEncoder) -> None:
    """Every check of the data the run makes, made now (scripts/train.py runs it, --validate_only
    included): pixel limits, the end-of-run export folder, every line of every file, the
    tokenizer loading, and with data.check_budgets_on_start every sample encoded against the
    budgets."""
    check_data_pixels(specs)
    if specs.run.export_hf_at_end:  # found at the start, not after hours of training
        prepare_out_dir(os.path.join(specs.run.workdir, "hf_export"), overwrite=True, sources=[specs.model.hf_dir])
    files = read_data_files(specs)
    encoder.tokenizer  # loads it, as the run does first: a broken tokenizer fails here
    if specs.data.check_budgets_on_start:
        check_budgets(specs, encoder, files)


def check_data_pixels(specs: Specs) -> None:
    """The pixel limits the data were converted with must be the model's: images were resized and
    boxes rescaled for them (scripts/convert_dataset.py records them in summary.json)."""
    data = specs.data
    summary = os.path.join(os.path.dirname(os.path.abspath(data.train_jsonl)), "summary.json")
    if not os.path.exists(summary):
        return
    with open(summary, encoding="utf-8") as f:
        params = json.load(f).get("params", {})
    for key in ("min_pixels", "max_pixels"):
        if key in params and params[key] != getattr(data, key):
            raise ValueError(f"{summary}: the data were converted with {key}={params[key]} but data.{key}="
                             f"{getattr(data, key)}; convert them again with the config's limits (or delete "
                             f"the folder when it is the demo's synthetic data)")


def read_data_files(specs: Specs) -> dict[str, list[Record]]:
    """data key ("train_jsonl", ...) -> its records, every line read as the run's loaders read it
    (a file set to "" has none). Raises on the first bad line unless data.skip_bad_samples, which
    logs and counts them; a train file without a usable record (or a val file, when one is set)
    is an error, since the run could not go on."""
    data = specs.data
    out = {}
    for key, name in FILES:
        path = getattr(data, key)
        out[key] = []
        if not path:
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (data.{key})")
        records, errors = load_records(path, skip_bad_samples=data.skip_bad_samples)
        for e in errors:
            log.warning("skipped bad record: %s", e)
        if errors:
            log.warning("%s: %d of %d %s records skipped (data.skip_bad_samples)", path, len(errors),
                        len(records) + len(errors), name)
        if not records and key != "teacher_pool_jsonl":
            detail = f"all {len(errors)} skipped as bad, the first: {errors[0]}" if errors else "the file is empty"
            hint = "" if key == "train_jsonl" else "; set data.val_jsonl='' to train without validation"
            raise ValueError(f"{path}: no usable {name} records ({detail}){hint}")
        out[key] = records
    return out


def check_budgets(specs: Specs, encoder: SampleEncoder, files: dict[str, list[Record]] | None = None) -> None:
    """Encodes every train and val student, every demonstration a record carries and every pool
    entry once, as the loaders will: a sample that cannot be encoded (an unreadable image, a box
    outside it) raises naming FILE:LINE, or is counted and skipped per skip_bad_samples; a sample
    whose own needs exceed a budget can never be packed, so that is a config error found before
    compiling. Demonstrations are drawn per step, so a student + the largest ones over budget is
    only warned about (the loader then raises or skips that draw, per skip_bad_samples)."""
    data = specs.data
    files = read_data_files(specs) if files is None else files
    longest: dict[str, tuple[int, str]] = {}
    skipped: list[str] = []

    def need(key, value, where):
        if value > longest.get(key, (-1, ""))[0]:
            longest[key] = (int(value), where)

    def encode(example: Example, source: str, record_id: str, orig_size=None):
        try:
            return encoder.encode(example, (), source=source, record_id=record_id, orig_size=orig_size)
        except RecordError as e:
            if not data.skip_bad_samples:
                raise
            log.warning("skipped bad sample: %s", e)
            skipped.append(str(e))
            return None

    demos = data.teacher_ratio > 0 and data.max_teachers > 0  # else no demonstration is ever encoded
    pool = [encode(p.student, p.source, p.id) for p in files["teacher_pool_jsonl"]] if demos else []
    pool_tokens = sorted(s.num_tokens for s in pool if s is not None)[-data.max_teachers:] if demos else []
    usable_train = 0
    worst_with_teachers = (0, "")
    for key in ("train_jsonl", "val_jsonl"):  # val is evaluated without demonstrations
        for r in files[key]:
            s = encode(r.student, r.source, r.id, r.orig_size)
            own = [encode(t, r.source, r.id) for t in r.teachers or ()] if demos and key == "train_jsonl" else []
            if s is None or any(t is None for t in own):
                continue
            usable_train += key == "train_jsonl"
            need("token_budget", s.num_tokens, r.source)
            need("patch_budget", s.num_patches, r.source)
            need("max_objects", len(s.gt_caption_ids), r.source)
            need("caption_tokens", max((len(x) for x in s.gt_caption_ids), default=0), r.source)
            need("vision_memory_tokens", len(s.det_vision_index), r.source)
            need("text_memory_tokens", len(s.det_text_index), r.source)
            if demos and key == "train_jsonl":
                largest = (sorted(t.num_tokens for t in own)[-data.max_teachers:] if r.teachers is not None
                           else pool_tokens)
                worst_with_teachers = max(worst_with_teachers, (s.num_tokens + sum(largest), r.source))
    if skipped:
        log.warning("%d bad samples skipped (data.skip_bad_samples)", len(skipped))
    if not usable_train:
        raise ValueError(f"{data.train_jsonl}: no usable train samples (every one was skipped as bad; "
                         f"the warnings above name each)")
    validate_budgets(data, longest)
    if worst_with_teachers[0] > data.token_budget:
        log.warning("data.token_budget=%d may be exceeded when a student gets its largest demonstrations "
                    "(about %d tokens at %s)", data.token_budget, *worst_with_teachers)
    log.info("budgets hold every train and val sample: %s", {k: v for k, (v, _) in longest.items()})
