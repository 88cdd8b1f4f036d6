"""Raw annotation readers behind a small registry: another export format is one function.

A reader takes the raw folder and yields `RawRecord`s (one per photo) with boxes in the photo's
own pixel coordinates (floats); conversion does the checking, rescaling and rounding. A record a
reader cannot interpret carries an `error` instead of objects, so conversion can skip-and-count it.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class RawRecord:
    source: str  # annotation file (and which entry of it)
    image_path: str
    objects: tuple[tuple[tuple[float, float, float, float], str], ...] = ()  # ((x1,y1,x2,y2), desc)
    error: str | None = None


DESC_MAP_NAME = "desc_map.json"  # a zh->en table that may sit in the raw folder; not an annotation
Reader = Callable[[str], Iterator[RawRecord]]
READERS: dict[str, Reader] = {}


def register_reader(name: str) -> Callable[[Reader], Reader]:
    def add(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn
    return add


def read_raw(input_dir: str, fmt: str) -> list[RawRecord]:
    """Every record of the raw folder; ValueError when the folder is missing or holds no annotation."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(READERS)}")
    if not os.path.isdir(input_dir):
        why = "is not a folder" if os.path.exists(input_dir) else "does not exist"
        raise ValueError(f"input_dir {input_dir} {why}")
    records = sorted(READERS[fmt](input_dir), key=lambda r: (r.image_path, r.source))
    if not records:
        raise ValueError(f"input_dir {input_dir} holds no {fmt} annotation (looked for **/*.json, "
                         f"{DESC_MAP_NAME} aside)")
    return records


def _annotation_files(input_dir: str) -> list[str]:
    paths = glob.glob(os.path.join(input_dir, "**", "*.json"), recursive=True)
    return sorted(p for p in paths if os.path.basename(p) != DESC_MAP_NAME)


def _bounds(points) -> tuple[float, float, float, float]:
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _labelme_shape_box(shape: dict) -> tuple[float, float, float, float]:
    kind = shape.get("shape_type") or "polygon"
    pts = shape.get("points")
    if not isinstance(pts, list) or not pts or not all(isinstance(p, list) and len(p) == 2 for p in pts):
        raise ValueError("points must be a list of [x, y]")
    if kind == "rectangle" and len(pts) == 2 or kind in ("polygon", "linestrip"):
        return _bounds(pts)
    if kind == "circle" and len(pts) == 2:
        (cx, cy), (px, py) = pts
        r = ((px - cx) ** 2 + (py - cy) ** 2) ** 0.5
        return cx - r, cy - r, cx + r, cy + r
    raise ValueError(f"unsupported shape_type {kind!r} with {len(pts)} points")


@register_reader("labelme")
def read_labelme(input_dir: str) -> Iterator[RawRecord]:
    """Every *.json under input_dir; rectangles as is, polygons/circles become their bounding box."""
    for path in _annotation_files(input_dir):
        folder = os.path.dirname(path)
        try:
            with open(path, encoding="utf-8") as f:
                ann = json.load(f)
            if not isinstance(ann, dict) or not isinstance(ann.get("shapes"), list):
                raise ValueError("not a LabelMe file (no 'shapes' list)")
            image_path = ann.get("imagePath")
            if not isinstance(image_path, str) or not image_path:
                raise ValueError("missing imagePath")
            image_path = os.path.normpath(os.path.join(folder, image_path.replace("\\", "/")))
            objects = []
            for i, shape in enumerate(ann["shapes"]):
                label = shape.get("label") if isinstance(shape, dict) else None
                if not isinstance(label, str):
                    raise ValueError(f"shapes[{i}]: missing label")
                try:
                    objects.append((_labelme_shape_box(shape), label))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"shapes[{i}] ({label}): {e}") from None
        except (OSError, ValueError) as e:
            yield RawRecord(path, path, error=str(e))
            continue
        yield RawRecord(path, image_path, tuple(objects))


def _coco_id(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _coco_categories(categories: list) -> dict:
    names = {}
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not _coco_id(c.get("id")) or not isinstance(c.get("name"), str):
            raise ValueError(f"categories[{i}] must be an object with an 'id' and a 'name' string")
        names[c["id"]] = c["name"]
    return names


def _coco_box(a: dict, names: dict) -> tuple[tuple[float, float, float, float], str]:
    bbox = a.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ValueError(f"bbox {bbox!r} must be [x, y, width, height]")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"bbox {bbox!r} must hold numbers") from None
    if not _coco_id(a.get("category_id")) or a["category_id"] not in names:
        raise ValueError(f"category_id {a.get('category_id')!r} is not in categories")
    return (x, y, x + w, y + h), names[a["category_id"]]


@register_reader("coco")
def read_coco(input_dir: str) -> Iterator[RawRecord]:
    """Every COCO *.json under input_dir; file_name relative to the json's folder or its images/.

    An entry that cannot be read (not an object, no id or file_name, a bad bbox or category, an
    annotation of an image id no image has) is a bad record naming the file and the entry."""
    for path in _annotation_files(input_dir):
        try:
            with open(path, encoding="utf-8") as f:
                coco = json.load(f)
            if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                                     for k in ("images", "annotations", "categories")):
                raise ValueError("not a COCO file (needs lists images, annotations, categories)")
            names = _coco_categories(coco["categories"])
        except (OSError, ValueError) as e:
            yield RawRecord(path, path, error=str(e))
            continue
        yield from _coco_records(path, coco, names)


def _coco_records(path: str, coco: dict, names: dict) -> Iterator[RawRecord]:
    folder = os.path.dirname(path)
    images: dict = {}  # id -> (images[] index, entry) of the readable images
    listed: set = set()  # every image id listed, readable or not: its annotations are not orphans
    errors: dict = {}  # image id -> why its record is bad
    for i, im in enumerate(coco["images"]):
        where = f"{path} (images[{i}])"
        if not isinstance(im, dict) or not _coco_id(im.get("id")):
            yield RawRecord(where, path, error="an image must be an object with an 'id' and a 'file_name'")
            continue
        if im["id"] in listed:  # which of the two its annotations mean is unknown: both are bad
            yield RawRecord(where, path, error=f"image id {im['id']} is listed twice")
            errors.setdefault(im["id"], f"image id {im['id']} is listed twice (also {where})")
            continue
        listed.add(im["id"])
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            yield RawRecord(where, path, error=f"image id {im['id']} has no file_name")
            continue
        images[im["id"]] = (i, im)
    objects: dict = {k: [] for k in images}
    orphans: dict = {}  # unknown image id -> the annotations pointing at it
    for j, a in enumerate(coco["annotations"]):
        where = f"annotations[{j}]" + (f" (id {a.get('id')})" if isinstance(a, dict) and "id" in a else "")
        if not isinstance(a, dict):
            yield RawRecord(f"{path} ({where})", path, error="an annotation must be an object")
        elif not _coco_id(a.get("image_id")) or a["image_id"] not in listed:
            orphans.setdefault(repr(a.get("image_id")), []).append(where)
        elif a["image_id"] in images:
            try:
                objects[a["image_id"]].append(_coco_box(a, names))
            except ValueError as e:
                errors.setdefault(a["image_id"], f"{where}: {e}")
    for image_id, entries in orphans.items():
        yield RawRecord(f"{path} (image_id {image_id})", path,
                        error=f"{len(entries)} annotation(s) point at image id {image_id}, which no image has: "
                              + ", ".join(entries))
    for image_id, (i, im) in images.items():
        source = f"{path} (images[{i}], id {image_id})"
        candidates = [os.path.join(folder, im["file_name"]), os.path.join(folder, "images", im["file_name"])]
        image_path = os.path.normpath(next((p for p in candidates if os.path.exists(p)), candidates[0]))
        if image_id in errors:
            yield RawRecord(source, image_path, error=errors[image_id])
        else:
            yield RawRecord(source, image_path, tuple(objects[image_id]))
