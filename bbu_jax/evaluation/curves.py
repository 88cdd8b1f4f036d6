"""A run's learning curves as one picture: losses on the left, val metrics (0..1) on the right.

Drawn with PIL, the project's one imaging dependency: a few polylines on two axes do not need a
plotting library that every install (and the GPU image's wheel set) would have to carry.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw

from bbu_jax.evaluation.visualize import _load_font, save_png

# (metric, color); a metric a run did not log is left out of the legend.
LOSS_SERIES = (("train/lm_loss", (31, 119, 180)), ("train/student_lm_loss", (23, 190, 207)),
               ("train/teacher_lm_loss", (148, 103, 189)), ("val/lm_loss", (214, 39, 40)),
               ("train/bbox_giou_loss", (255, 127, 14)), ("train/caption_loss", (44, 160, 44)))
METRIC_SERIES = (("val/head/box_AP50", (255, 127, 14)), ("val/head/type_mAP50", (214, 39, 40)),
                 ("val/head/caption_accuracy", (44, 160, 44)), ("val/generate/f1", (31, 119, 180)),
                 ("val/generate/box_recall", (23, 190, 207)), ("val/generate/complete_json", (127, 127, 127)))


def read_metrics(metrics_jsonl: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl (one per logged step or evaluation)."""
    with open(metrics_jsonl, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def series(rows: Sequence[Mapping], key: str) -> list[tuple[float, float]]:
    """(step, value) of ``key`` over the rows that logged a finite value of it."""
    return [(float(r["step"]), float(r[key])) for r in rows
            if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]


def draw_learning_curves(rows: Sequence[Mapping], *, title: str = "", size: tuple[int, int] = (1200, 480)
                         ) -> Image.Image:
    """Two panels over the steps: the loss terms (log-free: the y axis starts at 0) and the val
    metrics on a fixed 0..1 axis, each with its legend; val metrics are drawn with their points,
    since evaluations are few."""
    width, height = size
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    font = _load_font(None, 14)
    if title:
        draw.text((10, 6), title, fill="black", font=font)
    steps = [float(r["step"]) for r in rows if "step" in r] or [0.0]
    x_range = (0.0, max(max(steps), 1.0))
    panel_w = width // 2
    losses = [(k, c, series(rows, k)) for k, c in LOSS_SERIES]
    top = max((v for _, _, s in losses for _, v in s), default=1.0)
    _panel(draw, font, (0, 28, panel_w, height), "losses", losses, x_range, (0.0, top * 1.05), points=False)
    metrics = [(k, c, series(rows, k)) for k, c in METRIC_SERIES]
    _panel(draw, font, (panel_w, 28, width, height), "val metrics", metrics, x_range, (0.0, 1.0), points=True)
    return picture


def write_learning_curves(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike, *, title: str = "") -> str:
    """Draw the curves of a run's metrics.jsonl into ``out_png`` (atomically, its folder made if
    missing); returns its path."""
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    save_png(draw_learning_curves(read_metrics(metrics_jsonl), title=title), out_png)
    return os.fspath(out_png)


def _panel(draw: ImageDraw.ImageDraw, font, box, name: str, lines, x_range, y_range, *, points: bool) -> None:
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 56, x1 - 16, y0 + 24, y1 - 110  # room for ticks and the legend
    draw.text((left, y0 + 2), name, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline=(80, 80, 80))
    (sx0, sx1), (sy0, sy1) = x_range, y_range
    sy1 = sy1 if sy1 > sy0 else sy0 + 1.0

    def to_px(step: float, value: float) -> tuple[float, float]:
        fx = (step - sx0) / (sx1 - sx0)
        fy = (min(max(value, sy0), sy1) - sy0) / (sy1 - sy0)
        return left + fx * (right - left), bottom - fy * (bottom - top)

    for k in range(5):  # grid and tick labels
        value = sy0 + (sy1 - sy0) * k / 4
        _, y = to_px(sx0, value)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((x0 + 4, y - 7), f"{value:.2f}", fill=(60, 60, 60), font=font)
        step = sx0 + (sx1 - sx0) * k / 4
        x, _ = to_px(step, sy0)
        draw.text((x - 12, bottom + 4), f"{step:.0f}", fill=(60, 60, 60), font=font)
    draw.text((right - 30, bottom + 20), "step", fill=(60, 60, 60), font=font)
    shown = [(key, color, pts) for key, color, pts in lines if pts]
    for key, color, pts in shown:
        xy = [to_px(s, v) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        if points or len(xy) == 1:
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    for i, (key, color, pts) in enumerate(shown):  # legend: two columns below the axes
        lx, ly = left + (i % 2) * (right - left) // 2, bottom + 40 + (i // 2) * 20
        draw.line([(lx, ly + 8), (lx + 24, ly + 8)], fill=color, width=3)
        draw.text((lx + 30, ly), f"{key} ({pts[-1][1]:.3f})", fill="black", font=font)
