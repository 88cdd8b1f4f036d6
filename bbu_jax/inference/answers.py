"""Generate and parse grounding answers for JSONL records (what infer.py and evaluate.py share).

Each record's student image gets the training prompt: up to ``num_teachers`` demonstrations (the
record's own teachers when it has them, else distinct pool entries chosen with ``seed``, never
one showing the student's image), then the student's image(s) and instruction. Answers are
parsed back into boxes in the stored image's pixels (the frame of the JSONL's own boxes).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.pipeline import build_inference_inputs
from bbu_jax.data.schema import Example, Record, RecordError
from bbu_jax.inference.generate import generate_from_inputs
from bbu_jax.inference.parser import ParseStatus, parse_response
from bbu_jax.models.qwen2_5_vl import Qwen25VL


@dataclasses.dataclass
class Answer:
    record: Record
    response: str
    gt: list[dict]
    pred: list[dict]
    status: ParseStatus


def pick_teachers(record: Record, pool: Sequence[Example], num_teachers: int,
                  rng: np.random.Generator) -> tuple[Example, ...]:
    """The record's own teachers (at most num_teachers), else num_teachers distinct pool entries
    that do not show the student's images."""
    if num_teachers <= 0:
        return ()
    if record.teachers is not None:
        return record.teachers[:num_teachers]
    candidates = [i for i, p in enumerate(pool) if not set(p.images) & set(record.student.images)]
    n = min(num_teachers, len(candidates))
    return tuple(pool[i] for i in sorted(rng.choice(candidates, n, replace=False).tolist())) if n else ()


def generate_answers(model: Qwen25VL, encoder: SampleEncoder, records: Sequence[Record],
                     pool: Sequence[Example] = (), *, num_teachers: int, max_new_tokens: int,
                     batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     length_bucket: int = 256, patch_bucket: int = 1024, skip_bad_samples: bool = False,
                     progress: bool = True) -> tuple[list[Answer], list[str]]:
    """(answers in record order, errors of the records skipped when skip_bad_samples)."""
    errors: list[str] = []
    prompts = []  # (record, model inputs, info)
    for i, rec in enumerate(records):
        teachers = pick_teachers(rec, pool, num_teachers, np.random.default_rng((seed, i)))
        try:
            inputs, info = build_inference_inputs(encoder, rec.student.images, teachers)
        except RecordError as e:
            if not skip_bad_samples:
                raise
            errors.append(str(e))
            continue
        prompts.append((rec, inputs, info))
    answers = []
    starts = range(0, len(prompts), batch_size)
    for k in tqdm(starts, desc="generate", unit="batch", disable=not progress):
        chunk = prompts[k:k + batch_size]
        texts = generate_from_inputs(model, encoder.tokenizer, [c[1] for c in chunk],
                                     max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     temperature=temperature, top_p=top_p, seed=seed + k // batch_size,
                                     length_bucket=length_bucket, patch_bucket=patch_bucket)
        for (rec, _, info), text in zip(chunk, texts):
            pred, status = parse_response(text, tuple(info["resized_hw"]), tuple(info["stored_hw"]))
            gt = [{"bbox_2d": list(o.bbox), "desc": o.desc} for o in rec.student.objects]
            answers.append(Answer(rec, text, gt, pred, status))
    return answers, errors
