"""Checks of the data against the specs, run before any compile: a run never dies hours in on a
sample that cannot fit or on data converted for other pixel limits."""
from __future__ import annotations

import json
import logging
import os

from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.schema import load_records
from bbu_jax.workflows.config import Specs, validate_budgets

log = logging.getLogger(__name__)


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


def check_budgets(specs: Specs, encoder: SampleEncoder) -> None:
    """Encodes every train record's student once: a sample whose own needs exceed a budget can
    never be packed, so that is a config error found before compiling. Teachers are sampled per
    step, so a student + the largest teachers over budget is only warned about (the loader then
    raises or skips that draw, per skip_bad_samples)."""
    data = specs.data
    records, _ = load_records(data.train_jsonl, skip_bad_samples=data.skip_bad_samples)
    longest: dict[str, tuple[int, str]] = {}

    def need(key, value, where):
        if value > longest.get(key, (-1, ""))[0]:
            longest[key] = (int(value), where)

    for r in records:
        s = encoder.encode(r.student, r.teachers or (), source=r.source, record_id=r.id, orig_size=r.orig_size)
        need("token_budget", s.num_tokens, r.source)
        need("patch_budget", s.num_patches, r.source)
        need("max_objects", len(s.gt_caption_ids), r.source)
        need("caption_tokens", max((len(x) for x in s.gt_caption_ids), default=0), r.source)
        need("vision_memory_tokens", len(s.det_vision_index), r.source)
        need("text_memory_tokens", len(s.det_text_index), r.source)
    validate_budgets(data, longest)
    if data.teacher_pool_jsonl and data.teacher_ratio > 0 and data.max_teachers > 0:
        pool, _ = load_records(data.teacher_pool_jsonl, skip_bad_samples=data.skip_bad_samples)
        t = sorted((encoder.encode(p.student, (), source=p.source, record_id=p.id) for p in pool),
                   key=lambda s: s.num_tokens)[-data.max_teachers:]
        worst = longest["token_budget"][0] + sum(s.num_tokens for s in t)
        if worst > data.token_budget:
            log.warning("data.token_budget=%d may be exceeded when the longest student (%d tokens) gets the "
                        "%d longest teachers (about %d tokens)", data.token_budget,
                        longest["token_budget"][0], len(t), worst)
    log.info("budgets hold every train sample: %s", {k: v for k, (v, _) in longest.items()})
