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
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(READERS)}")
    return sorted(READERS[fmt](input_dir), key=lambda r: (r.image_path, r.source))


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


@register_reader("coco")
def read_coco(input_dir: str) -> Iterator[RawRecord]:
    """Every COCO *.json under input_dir; file_name relative to the json's folder or its images/."""
    for path in _annotation_files(input_dir):
        folder = os.path.dirname(path)
        try:
            with open(path, encoding="utf-8") as f:
                coco = json.load(f)
            if not isinstance(coco, dict) or not {"images", "annotations", "categories"} <= set(coco):
                raise ValueError("not a COCO file (needs images, annotations, categories)")
            names = {c["id"]: c["name"] for c in coco["categories"]}
            by_image: dict = {im["id"]: [] for im in coco["images"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            yield RawRecord(path, path, error=str(e))
            continue
        errors: dict = {}
        for a in coco["annotations"]:
            try:
                x, y, w, h = (float(v) for v in a["bbox"])
                by_image[a["image_id"]].append(((x, y, x + w, y + h), names[a["category_id"]]))
            except (KeyError, TypeError, ValueError) as e:
                errors.setdefault(a.get("image_id"), f"annotation {a.get('id')}: bad field {e}")
        for im in coco["images"]:
            source = f"{path} (image id {im['id']})"
            candidates = [os.path.join(folder, im["file_name"]), os.path.join(folder, "images", im["file_name"])]
            image_path = next((p for p in candidates if os.path.exists(p)), candidates[0])
            if im["id"] in errors:
                yield RawRecord(source, image_path, error=errors[im["id"]])
            else:
                yield RawRecord(source, os.path.normpath(image_path), tuple(by_image[im["id"]]))
