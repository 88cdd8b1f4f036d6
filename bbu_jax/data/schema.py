"""The JSONL training record, its three accepted forms, and validation naming FILE:LINE.

Forms (image paths relative to the JSONL's folder; boxes absolute integer pixels of the stored
image, x1 < x2, y1 < y2):
  teacher-student  {"teachers": [EX, ...], "student": EX}
  simple           {"images": [...], "objects": [...]}            (teachers come from the pool)
  examples/target  {"examples": [EX, ...], "target": EX}
where EX = {"images": [path, ...], "objects": [{"bbox_2d": [x1, y1, x2, y2], "desc": str}, ...]}.
A record with "teachers"/"examples" draws its demonstrations from those (possibly none), a
simple record from the pool; either way data.teacher_ratio and data.max_teachers decide how many
(encode.choose_teachers). Optional top-level keys written by conversion: "id" (str) and
"orig_size" ([height, width] of the raw photo); other keys are ignored.
The student has exactly one image: its detection targets and the head's vision memory are that
image's. A teacher may show several images; its objects then refer to the first.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from bbu_jax.models.qwen2_5_vl.processing import ImageInput

T = TypeVar("T")


class RecordError(ValueError):
    """A bad record; the message starts with FILE:LINE."""


@dataclasses.dataclass(frozen=True)
class Obj:
    bbox: tuple[int, int, int, int]  # x1, y1, x2, y2 absolute pixels
    desc: str


@dataclasses.dataclass(frozen=True)
class Example:
    images: tuple[ImageInput, ...]  # absolute paths in records; PIL images or arrays also at inference
    objects: tuple[Obj, ...]


@dataclasses.dataclass(frozen=True)
class Record:
    student: Example
    teachers: tuple[Example, ...] | None  # None: sample from the pool
    source: str  # "FILE:LINE"
    id: str
    orig_size: tuple[int, int] | None = None  # (height, width) of the raw photo


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ValueError(f"{what} must be an integer, got {v!r}")
    return int(v)


def parse_example(raw: Any, root: str, what: str) -> Example:
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must be an object with 'images' and 'objects'")
    images = raw.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        raise ValueError(f"{what}.images must be a non-empty list of paths")
    objects = raw.get("objects")
    if not isinstance(objects, list):
        raise ValueError(f"{what}.objects must be a list")
    objs = []
    for i, o in enumerate(objects):
        where = f"{what}.objects[{i}]"
        if not isinstance(o, dict):
            raise ValueError(f"{where} must be an object")
        box = o.get("bbox_2d")
        if not isinstance(box, list) or len(box) != 4:
            raise ValueError(f"{where}.bbox_2d must be [x1, y1, x2, y2]")
        x1, y1, x2, y2 = (_int(v, f"{where}.bbox_2d") for v in box)
        if min(x1, y1) < 0:
            raise ValueError(f"{where}.bbox_2d {box} has negative coordinates")
        if not (x1 < x2 and y1 < y2):
            raise ValueError(f"{where}.bbox_2d {box} is degenerate or inverted (needs x1<x2, y1<y2)")
        desc = o.get("desc")
        if not isinstance(desc, str) or not desc.strip():
            raise ValueError(f"{where}.desc must be a non-empty string")
        objs.append(Obj((x1, y1, x2, y2), desc))
    return Example(tuple(os.path.normpath(os.path.join(root, p)) for p in images), tuple(objs))


def parse_student(raw: Any, root: str, what: str) -> Example:
    ex = parse_example(raw, root, what)
    if len(ex.images) > 1:
        raise ValueError(f"{what}.images has {len(ex.images)} images, a student has one: the detection "
                         "targets and the head's vision memory are one image's (make one record per image)")
    return ex


def parse_record(raw: Any, root: str, source: str) -> Record:
    """One decoded JSON line -> Record; raises RecordError('FILE:LINE: reason')."""
    try:
        if not isinstance(raw, dict):
            raise ValueError("a record must be a JSON object")
        if "student" in raw:
            if not isinstance(raw.get("teachers", []), list):
                raise ValueError("'teachers' must be a list")
            teachers = tuple(parse_example(t, root, f"teachers[{i}]")
                             for i, t in enumerate(raw.get("teachers", [])))
            student = parse_student(raw["student"], root, "student")
        elif "target" in raw:
            if not isinstance(raw.get("examples", []), list):
                raise ValueError("'examples' must be a list")
            teachers = tuple(parse_example(t, root, f"examples[{i}]")
                             for i, t in enumerate(raw.get("examples", [])))
            student = parse_student(raw["target"], root, "target")
        elif "images" in raw:
            teachers, student = None, parse_student(raw, root, "record")
        else:
            raise ValueError("unknown record form: expected 'student', 'target' or 'images'")
        rid = raw.get("id", source)
        if not isinstance(rid, str):
            raise ValueError("'id' must be a string")
        orig = raw.get("orig_size")
        if orig is not None:
            if not isinstance(orig, list) or len(orig) != 2:
                raise ValueError("'orig_size' must be [height, width]")
            orig = tuple(_int(v, "orig_size") for v in orig)
    except ValueError as e:
        raise RecordError(f"{source}: {e}") from None
    return Record(student, teachers, source, rid, orig)


def decode_line(line: str, source: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"{source}: malformed JSON ({e.msg} at column {e.colno})") from None


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Yields (FILE:LINE, text) for each non-blank line."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{n}", line


def load_jsonl(path: str | os.PathLike, parse: Callable[[Any, str, str], T], *, skip_bad: bool = False
               ) -> tuple[list[T], list[str]]:
    """parse(raw, root folder, "FILE:LINE") of every line, plus the errors of skipped lines
    (RecordError raises on the first bad line unless ``skip_bad``)."""
    root = os.path.dirname(os.path.abspath(path))
    items, errors = [], []
    for source, line in iter_lines(path):
        try:
            items.append(parse(decode_line(line, source), root, source))
        except RecordError as e:
            if not skip_bad:
                raise
            errors.append(str(e))
    return items, errors


def load_records(path: str | os.PathLike, *, skip_bad_samples: bool = False
                 ) -> tuple[list[Record], list[str]]:
    """All records of a JSONL file plus the errors of skipped ones (raises on the first when not skipping)."""
    return load_jsonl(path, parse_record, skip_bad=skip_bad_samples)
