"""The learning-curve picture: every logged series drawn in its color, in the right panel, at the
right height; metrics a run did not log are left out."""
import json

import numpy as np

from bbu_jax.evaluation.curves import LOSS_SERIES, METRIC_SERIES, draw_learning_curves, series, write_learning_curves


def _rows():
    rows = [{"step": s, "train/lm_loss": 6.0 * 0.99 ** s} for s in range(10, 410, 10)]
    rows += [{"step": s, "val/head/type_mAP50": v, "val/generate/f1": float("nan") if s == 200 else v / 2}
             for s, v in ((200, 0.2), (400, 0.8))]
    return rows


def _has_color(picture, color, x_slice=slice(None)):
    pixels = np.asarray(picture)[:, x_slice]
    return bool(np.all(pixels == np.asarray(color, np.uint8), axis=-1).any())


def test_series_skips_rows_without_a_finite_value():
    assert series(_rows(), "val/generate/f1") == [(400.0, 0.4)]
    assert series(_rows(), "val/lm_loss") == []


def test_each_series_is_drawn_in_its_panel_and_absent_ones_are_not():
    picture = draw_learning_curves(_rows(), size=(1200, 480))
    colors = dict(LOSS_SERIES + METRIC_SERIES)
    left, right = slice(0, 600), slice(600, 1200)
    assert _has_color(picture, colors["train/lm_loss"], left)
    assert _has_color(picture, colors["val/head/type_mAP50"], right)
    assert not _has_color(picture, colors["val/head/type_mAP50"], left)
    assert not _has_color(picture, colors["train/teacher_lm_loss"])  # never logged
    # the 0.8 point sits near 80% of the metrics axis height (axes from y=52 to y=370)
    rows = np.nonzero(np.all(np.asarray(picture)[:, right] == colors["val/head/type_mAP50"], axis=-1))[0]
    top, bottom = 52, 370
    assert abs((bottom - rows.min()) / (bottom - top) - 0.8) < 0.05


def test_write_makes_the_folder_and_the_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = write_learning_curves(metrics, tmp_path / "pictures" / "curves.png", title="t")
    from PIL import Image
    assert Image.open(out).size == (1200, 480)
