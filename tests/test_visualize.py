"""Pictures: boxes drawn in the outcome colours, valid PNGs, CJK text with and without a CJK font."""
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbu_jax.data.schema import RecordError
from bbu_jax.evaluation.visualize import (BLUE, GREEN, ORANGE, RED, Labeler, comparison_grid,
                                          draw_comparison, find_cjk_font, load_records)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "visualize.py"
SCREW = "螺丝连接点/BBU安装螺丝/连接正确"
GT = [{"bbox_2d": [20, 20, 80, 60], "desc": SCREW},
      {"bbox_2d": [100, 30, 180, 90], "desc": "标签/光纤标签/清晰"},
      {"bbox_2d": [120, 100, 190, 140], "desc": "cable/fiber/ok"}]
PRED = [{"bbox_2d": [21, 20, 80, 61], "desc": SCREW, "score": 0.9},                # right
        {"bbox_2d": [100, 30, 180, 90], "desc": "标签/光纤标签/模糊", "score": 0.8},  # wrong desc
        {"bbox_2d": [5, 100, 40, 140], "desc": "cable/fiber/ok", "score": 0.4}]     # false


def gray_image(h=160, w=200):
    return np.full((h, w, 3), 90, np.uint8)


def has_color(img, color):
    return bool(np.all(np.asarray(img) == np.array(color, np.uint8), axis=-1).any())


@pytest.mark.parametrize("font_path", ["", None])  # PIL's default font; a CJK font if installed
def test_draw_comparison_colours_outcomes(font_path):
    img = draw_comparison(gray_image(), GT, PRED, panel_size=200, font_path=font_path, title="a.jpg")
    assert img.mode == "RGB" and img.width > 2 * 200 and img.height > 160
    for c in (GREEN, ORANGE, RED):
        assert has_color(img, c), c
    assert not has_color(img, BLUE)
    # All correct: no red or orange anywhere.
    img = draw_comparison(gray_image(), GT, GT, panel_size=200, font_path=font_path)
    assert has_color(img, GREEN) and not has_color(img, RED) and not has_color(img, ORANGE)


def test_single_panel_without_predictions():
    both = draw_comparison(gray_image(), GT, [], panel_size=200, font_path="")
    gt_only = draw_comparison(gray_image(), GT, None, panel_size=200, font_path="")
    assert gt_only.width < both.width
    assert has_color(gt_only, BLUE) and not has_color(gt_only, RED)
    assert has_color(both, RED)  # GT with no predictions: all missed


def test_cjk_without_cjk_font_is_replaced_not_crashing():
    labeler = Labeler(14, font_path="")
    assert labeler.text(SCREW) == "?/BBU?/?"
    assert labeler.text("cable/fiber/ok") == "cable/fiber/ok"
    draw_comparison(gray_image(), [{"bbox_2d": [0, 0, 199, 159], "desc": "螺丝" * 200}], None,
                    panel_size=120, font_path="")  # a label wider than the picture


def test_cjk_font_renders_chinese():
    path = find_cjk_font()
    if path is None:
        pytest.skip("no CJK font installed")
    labeler = Labeler(20, path)
    assert labeler.text(SCREW) == SCREW
    masks = [np.asarray(labeler.font.getmask(s)) for s in ("螺丝", "连接")]  # tofu would be equal
    assert masks[0].sum() > 0 and not np.array_equal(masks[0], masks[1])


def test_comparison_grid_for_tensorboard():
    samples = [(gray_image(), GT, PRED), (gray_image(120, 240).astype(np.float32) / 255, GT, None)]
    grid = comparison_grid(samples, panel_size=96, font_path="")
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    one = comparison_grid(samples[:1], panel_size=96, font_path="")
    assert grid.shape[0] > one.shape[0]


@pytest.fixture()
def predictions_jsonl(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(gray_image()).save(tmp_path / "images" / name)
    lines = [
        {"images": ["images/a.png"], "gt": GT, "pred": PRED, "response": "```json\n[]\n```"},
        {"images": ["images/b.png"], "objects": GT},  # a training record: GT only
        {"images": ["images/b.png"], "pred": PRED},   # predictions only
    ]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return path


def test_script_writes_pngs_and_contact_sheet(predictions_jsonl, tmp_path):
    main = runpy.run_path(str(SCRIPT))["main"]
    out = tmp_path / "viz"
    assert main(["--data", str(predictions_jsonl), "--output", str(out),
                 "--panel_size", "160", "--sheet_size", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000_a.png", "00001_b.png", "00002_b.png",
                     "contact_sheet_000.png", "contact_sheet_001.png"]
    for name in names:
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG"
    again = ["--data", str(predictions_jsonl), "--output", str(out), "--panel_size", "160"]
    assert main(again) == 1 and main([*again, "--overwrite"]) == 0  # a non-empty folder: only with --overwrite
    # --max_samples and --min_score
    out2 = tmp_path / "viz2"
    assert main(["--data", str(predictions_jsonl), "--output", str(out2),
                 "--max_samples", "1", "--min_score", "0.5", "--font", ""]) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["00000_a.png", "contact_sheet_000.png"]


def test_bad_records_name_file_and_line(predictions_jsonl, tmp_path):
    with open(predictions_jsonl, "a", encoding="utf-8") as f:
        f.write('{"images": ["images/a.png"], "pred": [{"bbox_2d": [1, 2], "desc": "x"}]}\n')
        f.write("not json\n")
    with pytest.raises(RecordError, match=r"preds.jsonl:4: pred\[0\]"):
        load_records(predictions_jsonl)
    records, errors = load_records(predictions_jsonl, skip_errors=True)
    assert len(records) == 3 and [e.split(": ")[0][-7:] for e in errors] == ["jsonl:4", "jsonl:5"]

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"images": ["images/nope.png"], "gt": []}\n', encoding="utf-8")
    main = runpy.run_path(str(SCRIPT))["main"]
    with pytest.raises(RecordError, match=r"missing.jsonl:1: cannot read image"):
        main(["--data", str(missing), "--output", str(tmp_path / "v3")])
    assert main(["--data", str(missing), "--output", str(tmp_path / "v3"), "--skip_bad_samples"]) == 1
