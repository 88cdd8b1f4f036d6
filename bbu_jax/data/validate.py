"""Dataset validation: every problem of a JSONL file as FILE:LINE: reason."""
from __future__ import annotations

import os

from bbu_jax.data.schema import Example, RecordError, decode_line, iter_lines, parse_record
from bbu_jax.models.qwen2_5_vl.processing import load_image


def _check_example(ex: Example, what: str) -> list[str]:
    problems = []
    for k, path in enumerate(ex.images):
        try:
            size = load_image(path).size  # the upright view the boxes and the model refer to
        except (OSError, ValueError) as e:
            problems.append(f"{what}.images[{k}] {path}: cannot read image ({e})")
            continue
        if k == 0:
            w, h = size
            for i, o in enumerate(ex.objects):
                if o.bbox[2] > w or o.bbox[3] > h:
                    problems.append(f"{what}.objects[{i}].bbox_2d {list(o.bbox)} out of bounds of {w}x{h} image {path}")
    return problems


def validate_jsonl(path: str | os.PathLike) -> list[str]:
    """All problems (schema, image missing/corrupt, boxes out of bounds) as 'FILE:LINE: reason'."""
    root = os.path.dirname(os.path.abspath(path))
    problems = []
    for source, line in iter_lines(path):
        try:
            rec = parse_record(decode_line(line, source), root, source)
        except RecordError as e:
            problems.append(str(e))
            continue
        examples = [("student", rec.student)] + [(f"teachers[{i}]", t) for i, t in enumerate(rec.teachers or ())]
        for what, ex in examples:
            problems += [f"{source}: {p}" for p in _check_example(ex, what)]
    return problems
