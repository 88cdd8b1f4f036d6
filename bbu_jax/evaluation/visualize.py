"""Pictures of ground truth next to predictions, for people and for TensorBoard.

Each picture puts the image twice side by side: ground truth on the left, predictions on the
right, every box labelled with its desc (and score). Colours say how a box fared at IoU >= 0.5:
green = found with the right desc, orange = box found but desc wrong, red = missed (GT) or
false (prediction), blue = nothing to compare with. Descs are Chinese or English; Chinese needs
a CJK font (Noto CJK, WenQuanYi, ...). Without one, PIL's default font draws the Latin part and
each run of CJK characters becomes '?', so the picture still says where the boxes are.

Input records (``load_records``), one JSON object per line of a JSONL file:

    {"images": ["images/a.jpeg"],                                    # relative to the JSONL's folder
     "gt":   [{"bbox_2d": [x1, y1, x2, y2], "desc": "..."}],          # optional
     "pred": [{"bbox_2d": [x1, y1, x2, y2], "desc": "...", "score": 0.9}],  # optional; score optional
     ...}                                                             # other keys (id, response) ignored

which is what scripts/infer.py writes (boxes in original-image pixels). A training-data record
(any form bbu_jax.data.schema accepts) is drawn as ground truth of its student image. With several
images, boxes are drawn on the first (objects refer to the first image, as in the schema).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import UInt8
from PIL import Image, ImageDraw, ImageFont

from bbu_jax.data.desc import normalize_desc
from bbu_jax.data.schema import RecordError, load_jsonl, parse_record
from bbu_jax.evaluation.metrics import box_iou, greedy_match
from bbu_jax.foundation.files import atomic_path
from bbu_jax.models.qwen2_5_vl.processing import load_image

GREEN, ORANGE, RED = (40, 180, 60), (245, 150, 20), (220, 40, 40)
BLUE = (30, 120, 230)  # nothing to compare with (GT-only or prediction-only records)
_BG = (24, 24, 24)
_CJK_FONT_PATHS = (  # Debian/Ubuntu, Fedora, Arch, macOS, Windows
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/wenquanyi/wqy-microhei/wqy-microhei.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)
# CJK radicals .. ideographs, Hangul, compatibility ideographs, full-width forms.
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef]+")


@dataclasses.dataclass
class VisualRecord:
    image_path: str
    gt: list[dict[str, Any]] | None
    pred: list[dict[str, Any]] | None
    source: str  # FILE:LINE


@functools.lru_cache(maxsize=None)
def find_cjk_font() -> str | None:
    """Path of an installed font that renders Chinese, or None."""
    for path in _CJK_FONT_PATHS:
        if os.path.isfile(path):
            return path
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True,
                                 timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        paths = sorted(line.split(":")[0].strip() for line in out.splitlines() if line.strip())
        paths = [p for p in paths if os.path.isfile(p)]
        if paths:  # prefer sans fonts (Noto Sans CJK, WenQuanYi) over serif ones
            return next((p for p in paths if "serif" not in p.lower()), paths[0])
    return None


class Labeler:
    """A font plus the rule for text it cannot draw (CJK without a CJK font becomes '?')."""

    def __init__(self, size: int, font_path: str | None = None):
        """``font_path``: a TrueType/OpenType file; None looks for a CJK font; "" forces PIL's
        default font (no CJK)."""
        path = find_cjk_font() if font_path is None else font_path
        self.font = _load_font(path, size)
        self.cjk = bool(path)  # a font chosen by the caller is trusted to cover its text

    def text(self, s: str) -> str:
        return s if self.cjk else _CJK.sub("?", s)


@functools.lru_cache(maxsize=16)
def _load_font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    """Loaded once per (path, size): CJK fonts are several MB. No path (None or "") is PIL's
    default font."""
    if not path:
        return ImageFont.load_default(size)
    # Noto's .ttc holds JP, KR, SC, TC, HK faces: take Simplified Chinese.
    return ImageFont.truetype(path, size, index=2 if "NotoSansCJK" in path else 0)


def draw_comparison(image: Image.Image | np.ndarray | str | os.PathLike,
                    gt: Sequence[Mapping[str, Any]] | None,
                    pred: Sequence[Mapping[str, Any]] | None,
                    *, panel_size: int = 768, font_path: str | None = None,
                    title: str | None = None, iou_threshold: float = 0.5) -> Image.Image:
    """GT (left) and predictions (right) drawn on ``image``; one panel when either is None.

    Args:
      image: PIL image, HW/HWC uint8 array (floats in [0, 1] are scaled), or a path; read as the
        model reads it (``load_image``), so boxes in the upright view land on their objects.
      gt, pred: objects ``{"bbox_2d": [x1, y1, x2, y2], "desc": str[, "score": float]}`` in the
        image's pixels.
      panel_size: the longer side of each panel; boxes are scaled with the image.
      font_path: see ``Labeler``.
      title: text for the header line (e.g. the file name).
    """
    img = _to_pil(image)
    scale = panel_size / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.Resampling.BILINEAR)
    labeler = Labeler(max(12, panel_size // 48), font_path)
    if gt is None or pred is None:
        gt_colors, pred_colors = [BLUE] * len(gt or []), [BLUE] * len(pred or [])
    else:
        gt_colors, pred_colors = _outcome_colors(gt, pred, iou_threshold)
    panels = []
    if gt is not None:
        panels.append(_panel(img, gt, gt_colors, scale, labeler, f"ground truth ({len(gt)})"))
    if pred is not None:
        panels.append(_panel(img, pred, pred_colors, scale, labeler, f"prediction ({len(pred)})"))
    if not panels:
        panels.append(_panel(img, [], [], scale, labeler, "image"))
    header = _text_height(labeler) + 8 if title else 0
    gap = 6
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1),
                            max(p.height for p in panels) + header), _BG)
    if title:
        ImageDraw.Draw(out).text((6, 4), labeler.text(title), fill=(235, 235, 235), font=labeler.font)
    x = 0
    for p in panels:
        out.paste(p, (x, header))
        x += p.width + gap
    return out


def comparison_grid(samples: Sequence[tuple[Any, Sequence[Mapping[str, Any]] | None,
                                            Sequence[Mapping[str, Any]] | None]],
                    *, panel_size: int = 384, font_path: str | None = None
                    ) -> UInt8[np.ndarray, "h w 3"]:
    """One row per (image, gt, pred) sample, GT | prediction, as an HWC uint8 array.

    For TensorBoard image summaries at evaluation time (tensorboardX ``add_image(...,
    dataformats="HWC")``).
    """
    if not samples:
        raise ValueError("comparison_grid needs at least one sample")
    rows = [draw_comparison(img, gt, pred, panel_size=panel_size, font_path=font_path)
            for img, gt, pred in samples]
    return np.asarray(_stack(rows, columns=1, gap=6), np.uint8)


def contact_sheet(pictures: Sequence[Image.Image], titles: Sequence[str] | None = None, *,
                  columns: int = 4, cell_width: int = 640, font_path: str | None = None) -> Image.Image:
    """Thumbnails of ``pictures`` in a grid, each under its title."""
    if not pictures:
        raise ValueError("contact_sheet needs at least one picture")
    labeler = Labeler(14, font_path)
    cells = []
    for i, pic in enumerate(pictures):
        thumb = _to_width(pic, cell_width)
        if titles is not None:
            th = _text_height(labeler) + 6
            cell = Image.new("RGB", (thumb.width, thumb.height + th), _BG)
            ImageDraw.Draw(cell).text((4, 2), _fit(labeler, titles[i], cell_width - 8),
                                      fill=(235, 235, 235), font=labeler.font)
            cell.paste(thumb, (0, th))
            thumb = cell
        cells.append(thumb)
    return _stack(cells, columns=columns, gap=8)


def load_records(jsonl_path: str | os.PathLike, *, skip_errors: bool = False
                 ) -> tuple[list[VisualRecord], list[str]]:
    """Records of a predictions or training JSONL (see the module docstring) and skipped errors.

    Raises RecordError('FILE:LINE: reason') on a bad line unless ``skip_errors``.
    """
    return load_jsonl(jsonl_path, _record, skip_bad=skip_errors)


def write_visualizations(records: Sequence[VisualRecord], output_dir: str | os.PathLike, *,
                         min_score: float = 0.0, panel_size: int = 768, sheet_size: int = 48,
                         columns: int = 4, cell_width: int = 640, font_path: str | None = None,
                         skip_errors: bool = False) -> tuple[list[str], list[str]]:
    """One PNG per record plus contact sheets of ``sheet_size`` records.

    Predictions with a ``score`` below ``min_score`` are not drawn. Files:
    ``NNNNN_<image stem>.png`` and ``contact_sheet_NNN.png`` in ``output_dir``. Returns (paths
    written, errors of records skipped); an unreadable image raises RecordError('FILE:LINE: ...')
    unless ``skip_errors``.
    """
    os.makedirs(output_dir, exist_ok=True)
    written, errors, thumbs, titles, sheets = [], [], [], [], 0
    for n, rec in enumerate(records):
        pred = rec.pred
        if pred is not None:
            pred = [o for o in pred if o.get("score", 1.0) >= min_score]
        title = os.path.basename(rec.image_path)
        try:
            picture = draw_comparison(rec.image_path, rec.gt, pred, panel_size=panel_size,
                                      font_path=font_path, title=title)
        except OSError as e:
            err = RecordError(f"{rec.source}: cannot read image {rec.image_path}: {e}")
            if not skip_errors:
                raise err from None
            errors.append(str(err))
        else:
            path = os.path.join(output_dir, f"{n:05d}_{os.path.splitext(title)[0]}.png")
            save_png(picture, path)
            written.append(path)
            thumbs.append(_to_width(picture, cell_width))  # keep only what the sheet needs
            titles.append(f"{n:05d} {title}")
        if thumbs and (len(thumbs) == sheet_size or n == len(records) - 1):
            path = os.path.join(output_dir, f"contact_sheet_{sheets:03d}.png")
            save_png(contact_sheet(thumbs, titles, columns=columns, cell_width=cell_width,
                                   font_path=font_path), path)
            written.append(path)
            thumbs, titles, sheets = [], [], sheets + 1
    return written, errors


def save_png(picture: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def _record(raw: Any, root: str, source: str) -> VisualRecord:
    if isinstance(raw, dict) and ("gt" in raw or "pred" in raw):
        images = raw.get("images")
        if not isinstance(images, list) or not images or not isinstance(images[0], str):
            raise RecordError(f"{source}: 'images' must be a non-empty list of paths")
        gt = _objects(raw.get("gt"), source, "gt")
        pred = _objects(raw.get("pred"), source, "pred")
        return VisualRecord(os.path.normpath(os.path.join(root, images[0])), gt, pred, source)
    rec = parse_record(raw, root, source)  # training data: draw the student's ground truth
    gt = [{"bbox_2d": list(o.bbox), "desc": o.desc} for o in rec.student.objects]
    return VisualRecord(rec.student.images[0], gt, None, source)


def _objects(raw: Any, source: str, key: str) -> list[dict[str, Any]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise RecordError(f"{source}: '{key}' must be a list of objects")
    for i, o in enumerate(raw):
        box = o.get("bbox_2d") if isinstance(o, dict) else None
        ok = (isinstance(box, list) and len(box) == 4
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
              and isinstance(o.get("desc"), str)
              and isinstance(o.get("score", 0.0), (int, float)))
        if not ok:
            raise RecordError(f"{source}: {key}[{i}] must be {{'bbox_2d': [x1, y1, x2, y2], "
                              f"'desc': str[, 'score': number]}}, got {json.dumps(o)[:200]}")
    return raw


def _to_pil(image: Image.Image | np.ndarray | str | os.PathLike) -> Image.Image:
    """The picture as the model saw it (``load_image``: upright, transparency on white)."""
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:  # floats in [0, 1]
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return load_image(image)


def _outcome_colors(gt, pred, iou_threshold) -> tuple[list, list]:
    """Per object colour: green matched with the same desc, orange box only, red unmatched."""
    gt_c, pred_c = [RED] * len(gt), [RED] * len(pred)
    if not gt or not pred:
        return gt_c, pred_c
    iou = box_iou([o["bbox_2d"] for o in pred], [o["bbox_2d"] for o in gt])
    for i, j in greedy_match(iou, iou_threshold):
        gt_c[j] = pred_c[i] = ORANGE
    same = np.array([[normalize_desc(p["desc"]) == normalize_desc(g["desc"]) for g in gt]
                     for p in pred])
    for i, j in greedy_match(iou, iou_threshold, allowed=same):
        gt_c[j] = pred_c[i] = GREEN
    return gt_c, pred_c


def _panel(img: Image.Image, objs, colors, scale: float, labeler: Labeler, heading: str) -> Image.Image:
    panel = img.copy()
    draw = ImageDraw.Draw(panel)
    width = max(2, round(max(panel.size) / 320))
    # Big boxes first, so the labels of small boxes inside them stay on top.
    order = sorted(range(len(objs)), key=lambda k: -_area(objs[k]["bbox_2d"]))
    boxes = {k: [float(v) * scale for v in objs[k]["bbox_2d"]] for k in order}
    for k in order:
        draw.rectangle(boxes[k], outline=colors[k], width=width)
    placed: list[tuple[float, float, float, float]] = []
    for k in order:
        o, color = objs[k], colors[k]
        x1, y1, x2, y2 = boxes[k]
        label = o["desc"] + (f" {o['score']:.2f}" if "score" in o else "")
        text = _fit(labeler, label, max(60, panel.width // 2))
        l, t, r, b = draw.textbbox((0, 0), text, font=labeler.font)
        tw, th = r - l + 6, b - t + 4
        tx = min(max(0.0, x1), max(0.0, panel.width - tw))
        # Above the box, inside its top, below it, inside its bottom: the first spot that is on
        # the picture and clear of the labels already drawn.
        spots = [ty for ty in (y1 - th, y1 + width, y2, y2 - th - width)
                 if 0 <= ty <= panel.height - th] or [min(max(0.0, y1), panel.height - th)]
        ty = next((ty for ty in spots if not any(_overlap((tx, ty, tx + tw, ty + th), p) for p in placed)),
                  spots[0])
        placed.append((tx, ty, tx + tw, ty + th))
        draw.rectangle(placed[-1], fill=color)
        draw.text((tx + 3 - l, ty + 2 - t), text, fill=(255, 255, 255), font=labeler.font)
    strip = _text_height(labeler) + 8
    out = Image.new("RGB", (panel.width, panel.height + strip), _BG)
    ImageDraw.Draw(out).text((5, 4), heading, fill=(255, 255, 255), font=labeler.font)
    out.paste(panel, (0, strip))
    return out


def _to_width(picture: Image.Image, width: int) -> Image.Image:
    if picture.width == width:
        return picture
    height = max(1, round(picture.height * width / picture.width))
    return picture.resize((width, height), Image.Resampling.BILINEAR)


def _fit(labeler: Labeler, text: str, max_width: int) -> str:
    """The text, shortened with '…' ('...' for the default font) to ``max_width`` pixels."""
    text = labeler.text(text)
    if labeler.font.getlength(text) <= max_width:
        return text
    ellipsis = "…" if labeler.cjk else "..."
    while text and labeler.font.getlength(text + ellipsis) > max_width:
        text = text[:-1]
    return text + ellipsis


def _text_height(labeler: Labeler) -> int:
    l, t, r, b = labeler.font.getbbox("Hg国")
    return b - t


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _area(box) -> float:
    return max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1]))


def _stack(pictures: Sequence[Image.Image], columns: int, gap: int) -> Image.Image:
    """Pictures in a grid of ``columns``, each row as tall as its tallest picture."""
    rows = [pictures[i:i + columns] for i in range(0, len(pictures), columns)]
    col_w = [max(r[c].width for r in rows if c < len(r)) for c in range(min(columns, len(pictures)))]
    row_h = [max(p.height for p in r) for r in rows]
    out = Image.new("RGB", (sum(col_w) + gap * (len(col_w) - 1), sum(row_h) + gap * (len(rows) - 1)), _BG)
    y = 0
    for r, h in zip(rows, row_h):
        x = 0
        for c, p in enumerate(r):
            out.paste(p, (x, y))
            x += col_w[c] + gap
        y += h + gap
    return out
