"""Synthetic BBU rack scenes written as LabelMe data: the embedded default dataset.

Each image is a dark equipment rack (rails with mounting holes, slot lines, noise) with parts
drawn in a grid of cells, large and high-contrast so a tiny model learns them on a CPU in minutes.
The status is in the pixels: a tight screw is a silver disc with an upright cross, a loose one an
orange-rimmed disc with a tilted cross and a gap; a connected fiber has its orange cable touching
the blue connector, a disconnected one a gap; a readable label has black text bars on white, an
unreadable one faint smudges on grey; a connected power socket has a red plug, an empty one shows
its three holes. A BBU chassis (light grey, green LEDs) may span a band behind the parts.
Labels are written in zh; `DESC_TYPES` (and desc_map.json next to the data) give the en wording.

`write_field_dataset` makes a different kind of data, for measuring the loader rather than
training: flat pictures with the pixel sizes and object counts of field photos.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from bbu_jax.foundation.files import atomic_path, write_json_atomic

# zh desc -> en desc; type/part/status.
DESC_TYPES: dict[str, str] = {
    "BBU设备/BBU主机/显示完整": "BBU device/BBU unit/fully visible",
    "螺丝连接点/BBU安装螺丝/连接正确": "screw point/BBU mounting screw/tightened",
    "螺丝连接点/BBU安装螺丝/连接错误": "screw point/BBU mounting screw/loose",
    "光纤/光纤接头/连接正确": "fiber/fiber connector/connected",
    "光纤/光纤接头/未连接": "fiber/fiber connector/disconnected",
    "标签/线缆标签/清晰可读": "label/cable label/readable",
    "标签/线缆标签/模糊不清": "label/cable label/unreadable",
    "接地线/接地线缆/连接正确": "ground/ground cable/connected",
    "电源接口/电源线/已连接": "power port/power cable/connected",
    "电源接口/电源线/未连接": "power port/power cable/empty",
}
_BBU = "BBU设备/BBU主机/显示完整"
_PARTS = [d for d in DESC_TYPES if d != _BBU]


def _screw(d: ImageDraw.ImageDraw, b, tight: bool, rng) -> None:
    x1, y1, x2, y2 = b
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, min(x2 - x1, y2 - y1) / 2
    if tight:
        d.ellipse(b, fill=(205, 205, 210), outline=(90, 90, 95), width=3)
        d.line([(cx - r * .6, cy), (cx + r * .6, cy)], fill=(20, 20, 20), width=max(3, int(r / 5)))
        d.line([(cx, cy - r * .6), (cx, cy + r * .6)], fill=(20, 20, 20), width=max(3, int(r / 5)))
    else:
        d.ellipse(b, fill=(255, 140, 20))  # orange rim, the disc sits off-centre (backed out)
        d.ellipse([x1 + r * .35, y1 + r * .1, x2 - r * .05, y2 - r * .3], fill=(170, 170, 175))
        k = r * .45
        d.line([(cx - k, cy - k), (cx + k, cy + k)], fill=(200, 0, 0), width=max(3, int(r / 5)))
        d.line([(cx - k, cy + k), (cx + k, cy - k)], fill=(200, 0, 0), width=max(3, int(r / 5)))


def _fiber(d, b, connected: bool, rng) -> None:
    x1, y1, x2, y2 = b
    w, h = x2 - x1, y2 - y1
    d.rectangle([x1 + w * .25, y1, x2 - w * .25, y1 + h * .4], fill=(30, 90, 220), outline=(200, 220, 255), width=2)
    top = y1 + h * .4 if connected else y1 + h * .62
    d.rectangle([x1 + w * .4, top, x2 - w * .4, y2], fill=(255, 150, 0))
    if not connected:
        d.rectangle([x1 + w * .3, top - h * .04, x2 - w * .3, top + h * .06], fill=(255, 230, 0))


def _label(d, b, readable: bool, rng) -> None:
    x1, y1, x2, y2 = b
    h = y2 - y1
    d.rectangle(b, fill=(250, 250, 250) if readable else (150, 150, 140), outline=(0, 0, 0), width=2)
    for k in range(3):
        yy = y1 + h * (.2 + .27 * k)
        length = (x2 - x1) * (.55 + .3 * rng.random())
        color = (10, 10, 10) if readable else (175, 175, 165)
        d.rectangle([x1 + 6, yy, x1 + 6 + length - 12, yy + h * .12], fill=color)


def _ground(d, b, _, rng) -> None:
    x1, y1, x2, y2 = b
    w, h = x2 - x1, y2 - y1
    d.ellipse([x1, y1, x1 + w * .35, y1 + h * .35], outline=(230, 230, 230), width=max(3, int(w / 12)))
    for k in range(8):  # yellow-green stripes along the diagonal
        t0, t1 = .25 + .09 * k, .25 + .09 * (k + 1)
        d.line([(x1 + w * t0, y1 + h * t0), (x1 + w * min(t1, 1), y1 + h * min(t1, 1))],
               fill=(240, 220, 0) if k % 2 else (0, 170, 60), width=max(6, int(w / 6)))


def _power(d, b, connected: bool, rng) -> None:
    x1, y1, x2, y2 = b
    w, h = x2 - x1, y2 - y1
    d.rectangle(b, fill=(15, 15, 15), outline=(140, 140, 140), width=3)
    if connected:
        d.rectangle([x1 + w * .2, y1 + h * .2, x2 - w * .2, y2 - h * .2], fill=(220, 30, 30))
        d.rectangle([x1 + w * .42, y2 - h * .2, x2 - w * .42, y2], fill=(220, 30, 30))
    else:
        for fx, fy in ((.3, .35), (.7, .35), (.5, .7)):
            cx, cy, r = x1 + w * fx, y1 + h * fy, min(w, h) * .09
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(240, 240, 240))


_DRAW = {
    "螺丝连接点/BBU安装螺丝/连接正确": (_screw, True, 1.0),  # (fn, status flag, aspect w/h)
    "螺丝连接点/BBU安装螺丝/连接错误": (_screw, False, 1.0),
    "光纤/光纤接头/连接正确": (_fiber, True, .6),
    "光纤/光纤接头/未连接": (_fiber, False, .6),
    "标签/线缆标签/清晰可读": (_label, True, 2.0),
    "标签/线缆标签/模糊不清": (_label, False, 2.0),
    "接地线/接地线缆/连接正确": (_ground, True, 1.0),
    "电源接口/电源线/已连接": (_power, True, 1.2),
    "电源接口/电源线/未连接": (_power, False, 1.2),
}


def _background(rng, w: int, h: int) -> Image.Image:
    base = np.full((h, w, 3), (38, 40, 46), np.float32)
    base += rng.normal(0, 4, (h, w, 1))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for x in (0, w - 14):  # rails with mounting holes
        d.rectangle([x, 0, x + 13, h], fill=(95, 98, 105))
        for y in range(6, h, 18):
            d.rectangle([x + 4, y, x + 9, y + 6], fill=(20, 20, 22))
    for y in range(int(rng.integers(20, 40)), h, 44):  # slot lines
        d.line([(14, y), (w - 15, y)], fill=(55, 58, 64), width=1)
    return img


def generate_scene(rng: np.random.Generator, width: int, height: int
                   ) -> tuple[Image.Image, list[tuple[tuple[int, int, int, int], str]]]:
    """One rack photo and its (box, zh desc) list; boxes inclusive-exclusive integer pixels."""
    img = _background(rng, width, height)
    d = ImageDraw.Draw(img)
    objects = []
    rows, cols = 2, 3
    cell_h, cell_w = (height - 8) / rows, (width - 36) / cols
    if rng.random() < 0.5:  # a BBU chassis behind one row of cells
        r = int(rng.integers(rows))
        b = (18, int(4 + r * cell_h), width - 18, int(4 + (r + 1) * cell_h))
        d.rectangle(b, fill=(175, 178, 182), outline=(230, 230, 230), width=3)
        for k in range(4):
            d.rectangle([b[0] + 8 + 12 * k, b[1] + 6, b[0] + 14 + 12 * k, b[1] + 12], fill=(0, 230, 60))
        objects.append((b, _BBU))
    n = 0 if rng.random() < 0.03 else int(rng.integers(2, rows * cols + 1))
    for cell in rng.permutation(rows * cols)[:n]:
        desc = _PARTS[int(rng.integers(len(_PARTS)))]
        fn, flag, aspect = _DRAW[desc]
        r, c = divmod(int(cell), cols)
        cx0, cy0 = 18 + c * cell_w, 4 + r * cell_h
        bh = min(cell_h * rng.uniform(.55, .85), cell_w * .9 / aspect)
        bw = bh * aspect
        x1 = cx0 + rng.uniform(0, cell_w - bw)
        y1 = cy0 + rng.uniform(0, cell_h - bh)
        b = (int(x1), int(y1), int(x1 + bw), int(y1 + bh))
        fn(d, b, flag, rng)
        objects.append((b, desc))
    return img, objects


def write_labelme_dataset(output_dir: str, num_images: int, seed: int, scale: int = 1) -> list[str]:
    """Write `num_images` scenes as {stem}.jpg + {stem}.json (LabelMe 5) and desc_map.json.

    scale > 1 enlarges each scene (and its boxes) by that factor: field photos are larger than
    max_pixels, so conversion then resizes them down as it would a real photo."""
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    os.makedirs(output_dir, exist_ok=True)
    stems = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        w, h = int(rng.integers(10, 17)) * 28, int(rng.integers(8, 13)) * 28
        img, objects = generate_scene(rng, w, h)
        if scale > 1:
            w, h = w * scale, h * scale
            img = img.resize((w, h), Image.Resampling.BICUBIC)
            objects = [(tuple(v * scale for v in b), desc) for b, desc in objects]
        stems.append(_write_labelme(output_dir, f"bbu_{seed}_{i:05d}", img, objects, quality=95))
    write_json_atomic(os.path.join(output_dir, "desc_map.json"), DESC_TYPES, indent=1)
    return stems


def _write_labelme(output_dir: str, stem: str, img: Image.Image, objects, quality: int) -> str:
    """{stem}.jpg + {stem}.json (LabelMe 5, one rectangle per object); returns the stem."""
    with atomic_path(os.path.join(output_dir, stem + ".jpg")) as tmp:
        img.save(tmp, format="JPEG", quality=quality)
    shapes = [{"label": desc, "points": [[b[0], b[1]], [b[2], b[3]]], "group_id": None,
               "shape_type": "rectangle", "flags": {}} for b, desc in objects]
    ann = {"version": "5.0.1", "flags": {}, "shapes": shapes, "imagePath": stem + ".jpg",
           "imageData": None, "imageHeight": img.height, "imageWidth": img.width}
    write_json_atomic(os.path.join(output_dir, stem + ".json"), ann, indent=1)
    return stem


# Field photos as the phones on site take them: (aspect w:h, share). The rest are small photos
# (thumbnails, crops, old phones) of random size below max_pixels.
FIELD_ASPECTS = ((3 / 4, 0.45), (4 / 3, 0.25), (9 / 16, 0.15))
FIELD_SMALL_SHARE = 0.15
FIELD_LONG_SIDE = 1280  # above every aspect's max_pixels side at the base limits: conversion resizes


def _field_objects(rng: np.random.Generator) -> int:
    """Objects per photo: 2..45, long-tailed (most photos show a handful of parts, a few a whole
    cabinet of screws and cables)."""
    return int(min(45, 2 + np.floor(rng.lognormal(np.log(7), 0.8))))


def generate_field_photo(rng: np.random.Generator, width: int, height: int
                         ) -> tuple[Image.Image, list[tuple[tuple[int, int, int, int], str]]]:
    """A phone photo of a BBU site for packing studies: what matters there is its pixel size and
    its object count, so the picture is flat (a wall, a cabinet, outlined parts) and fast to make."""
    img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(90, 200, 3)))
    d = ImageDraw.Draw(img)
    d.rectangle([width * .1, height * .08, width * .9, height * .92], fill=(48, 50, 56))  # the cabinet
    objects = []
    for _ in range(_field_objects(rng)):
        desc = _PARTS[int(rng.integers(len(_PARTS)))] if rng.random() > 0.05 else _BBU
        bw = int(width * rng.uniform(.04, .3 if desc != _BBU else .8))
        bh = int(height * rng.uniform(.03, .25 if desc != _BBU else .4))
        x1, y1 = int(rng.integers(0, width - bw)), int(rng.integers(0, height - bh))
        b = (x1, y1, x1 + bw, y1 + bh)
        d.rectangle(b, outline=tuple(int(v) for v in rng.integers(0, 256, 3)), width=3)
        objects.append((b, desc))
    return img, objects


def field_photo_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one field photo: a phone aspect at full size, or a small one."""
    u = rng.random()
    for aspect, share in FIELD_ASPECTS:
        if u < share:
            long = FIELD_LONG_SIDE
            return (long, int(long / aspect)) if aspect > 1 else (int(long * aspect), long)
        u -= share
    short = int(rng.integers(240, 520))
    return (short, int(short * 4 / 3)) if rng.random() < 0.7 else (int(short * 4 / 3), short)


def write_field_dataset(output_dir: str, num_images: int, seed: int) -> list[str]:
    """Write `num_images` field-like photos as LabelMe data (+ desc_map.json), for measuring how
    the loader packs real data: phone aspects (3:4, 4:3, 9:16) larger than the base pixel limits,
    some small photos, 2..45 objects per photo with long-tailed counts, three-level zh descs.
    The demo's rack scenes (write_labelme_dataset) are far smaller and emptier than this."""
    os.makedirs(output_dir, exist_ok=True)
    stems = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i, 1])
        w, h = field_photo_size(rng)
        img, objects = generate_field_photo(rng, w, h)
        stems.append(_write_labelme(output_dir, f"field_{seed}_{i:05d}", img, objects, quality=85))
    write_json_atomic(os.path.join(output_dir, "desc_map.json"), DESC_TYPES, indent=1)
    return stems
