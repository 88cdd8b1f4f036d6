"""Generate and parse grounding answers for JSONL records (what infer.py and evaluate.py share).

Each record's student image gets the training prompt: up to ``num_teachers`` demonstrations (the
record's own teachers when it has them, else distinct pool entries chosen with ``seed``, never
one showing the student's image), then the student's image(s) and instruction. Answers are
parsed back into boxes in the stored image's pixels (the frame of the JSONL's own boxes).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

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
    that do not show the student's images (files; an in-memory image is no pool entry)."""
    if num_teachers <= 0:
        return ()
    if record.teachers is not None:
        return record.teachers[:num_teachers]
    own = {x for x in record.student.images if isinstance(x, (str, os.PathLike))}
    candidates = [i for i, p in enumerate(pool) if not set(p.images) & own]
    n = min(num_teachers, len(candidates))
    return tuple(pool[i] for i in sorted(rng.choice(candidates, n, replace=False).tolist())) if n else ()


@dataclasses.dataclass
class Prompt:
    """A student's model inputs (build_inference_inputs) and its image sizes."""
    inputs: dict[str, np.ndarray]
    info: dict


def build_prompts(encoder: SampleEncoder, students: Sequence[Record], pool: Sequence[Example] = (), *,
                  num_teachers: int, seed: int = 0, skip_bad_samples: bool = False
                  ) -> tuple[list[tuple[Record, Prompt]], list[str]]:
    """(record, prompt) for each usable record, and the errors of the records skipped when
    skip_bad_samples (else the first bad record raises RecordError)."""
    errors: list[str] = []
    prompts = []
    for i, rec in enumerate(students):
        teachers = pick_teachers(rec, pool, num_teachers, np.random.default_rng((seed, i)))
        try:
            prompts.append((rec, Prompt(*build_inference_inputs(encoder, rec.student.images, teachers,
                                                                source=rec.source))))
        except RecordError as e:
            if not skip_bad_samples:
                raise
            errors.append(str(e))
    return prompts, errors


def answer_prompts(model: Qwen25VL, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int,
                   batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   length_bucket: int = 256, patch_bucket: int = 1024, progress: bool = True
                   ) -> list[tuple[str, list[dict], ParseStatus]]:
    """(generated text, parsed objects in pixels of the image as given, parse status) per prompt."""
    out = []
    starts = range(0, len(prompts), batch_size)
    for k in tqdm(starts, desc="generate", unit="batch", disable=not progress):
        chunk = prompts[k:k + batch_size]
        texts = generate_from_inputs(model, tokenizer, [c.inputs for c in chunk], max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, temperature=temperature, top_p=top_p,
                                     seed=seed + k // batch_size, length_bucket=length_bucket,
                                     patch_bucket=patch_bucket)
        for prompt, text in zip(chunk, texts):
            pred, status = parse_response(text, tuple(prompt.info["resized_hw"]), tuple(prompt.info["stored_hw"]))
            out.append((text, pred, status))
    return out


def generate_answers(model: Qwen25VL, encoder: SampleEncoder, records: Sequence[Record],
                     pool: Sequence[Example] = (), *, num_teachers: int, max_new_tokens: int,
                     batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     length_bucket: int = 256, patch_bucket: int = 1024, skip_bad_samples: bool = False,
                     progress: bool = True) -> tuple[list[Answer], list[str]]:
    """(answers in record order, errors of the records skipped when skip_bad_samples)."""
    prompts, errors = build_prompts(encoder, records, pool, num_teachers=num_teachers, seed=seed,
                                    skip_bad_samples=skip_bad_samples)
    results = answer_prompts(model, encoder.tokenizer, [p for _, p in prompts], max_new_tokens=max_new_tokens,
                             batch_size=batch_size, temperature=temperature, top_p=top_p, seed=seed,
                             length_bucket=length_bucket, patch_bucket=patch_bucket, progress=progress)
    answers = [Answer(rec, text, truth(rec), pred, status) for (rec, _), (text, pred, status) in zip(prompts, results)]
    return answers, errors


def truth(record: Record) -> list[dict]:
    """The record's objects in the prediction format."""
    return [{"bbox_2d": list(o.bbox), "desc": o.desc} for o in record.student.objects]


def prediction_row(record_id: str, images: Sequence[str], gt: list[dict], pred: list[dict], out_dir: str | Path,
                   *, response: str | None = None, status: ParseStatus | None = None) -> dict:
    """One line of a predictions file (what scripts/visualize.py draws): image paths relative to
    the file's folder, boxes in pixels of the stored image; generated rows add the response and
    its parse status."""
    row = {"id": record_id, "images": [os.path.relpath(x, out_dir) for x in images], "gt": gt, "pred": pred}
    if response is not None:
        row["response"] = response
        row["parse_status"] = None if status is None else status.to_dict()
    return row
