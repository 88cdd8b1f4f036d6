"""Datasets are never lost: conversion's faults and bad input (issue 17), teacher sampling of every
record form, students with several images. Tiny hand-made LabelMe / COCO folders, no tokenizer."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbu_jax.data import convert, readers, schema
from bbu_jax.data.encode import choose_teachers
from bbu_jax.data.validate import validate_jsonl

ROOT = Path(__file__).resolve().parents[1]
W, H = 112, 84  # inside the pixel limits below: stored unscaled, so boxes keep their pixels
KW = dict(min_pixels=3136, max_pixels=56 * 56 * 4, val_ratio=0.0, teacher_pool_size=0, seed=0, progress=False)


def _labelme(folder: Path, name: str, shapes, color=(200, 30, 30), ext=".jpg", json_name=None) -> Path:
    """One photo and its LabelMe file; shapes are (points, label) rectangles."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H), color).save(folder / f"{name}{ext}")
    ann = {"imagePath": f"{name}{ext}", "imageHeight": H, "imageWidth": W,
           "shapes": [{"label": label, "shape_type": "rectangle", "points": pts} for pts, label in shapes]}
    path = folder / f"{json_name or name}.json"
    path.write_text(json.dumps(ann))
    return path


def _raw(folder: Path, names, color=(200, 30, 30)) -> Path:
    for n in names:
        _labelme(folder, n, [([[5, 5], [40, 30]], "screw/loose")], color)
    return folder


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts/convert_dataset.py"), "--format", "labelme", "--min_pixels",
           "3136", "--max_pixels", str(56 * 56 * 4), "--val_ratio", "0", "--teacher_pool_size", "0", "--seed", "0",
           "--num_workers", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_missing_empty_or_unreadable_input_is_an_error_and_keeps_the_old_dataset(tmp_path):
    out = tmp_path / "data"
    convert.convert_dataset(str(_raw(tmp_path / "raw", ["a", "b"])), "labelme", str(out), **KW)
    before = _snapshot(out)
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.json").write_text(json.dumps({"not": "labelme"}))
    for raw, why in [(tmp_path / "mistyped", r"input_dir .*mistyped does not exist"),
                     (tmp_path / "empty", r"input_dir .*empty holds no labelme annotation"),
                     (bad, r"none of the 1 record\(s\) could be converted, the first: .*x.json: not a LabelMe")]:
        with pytest.raises(ValueError, match=why):
            convert.convert_dataset(str(raw), "labelme", str(out), overwrite=True, skip_bad_samples=True, **KW)
        assert _snapshot(out) == before and _leftovers(tmp_path) == []
    res = _cli("--input_dir", str(tmp_path / "mistyped"), "--output_dir", str(out), "--overwrite")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines() == [f"error: input_dir {tmp_path / 'mistyped'} does not exist"]
    assert _snapshot(out) == before


def test_output_dir_refused_unless_overwrite_then_replaced_whole_or_kept(tmp_path, monkeypatch):
    raw_a, raw_b = _raw(tmp_path / "raw_a", ["a1", "a2", "a3"]), _raw(tmp_path / "raw_b", ["b1", "b2"])
    out = tmp_path / "data"
    convert.convert_dataset(str(raw_a), "labelme", str(out), **KW)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        convert.convert_dataset(str(raw_b), "labelme", str(out), **KW)
    assert _snapshot(out) == before
    res = _cli("--input_dir", str(raw_b), "--output_dir", str(out))
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1 and "--overwrite" in res.stderr
    # killed half-way (Ctrl-C on the second photo): the old dataset stays, no temporary is left
    real, calls = convert.convert_one, []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(convert, "convert_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_dataset(str(raw_b), "labelme", str(out), overwrite=True, **KW)
    monkeypatch.undo()
    assert _snapshot(out) == before and _leftovers(tmp_path) == []
    summary = convert.convert_dataset(str(raw_b), "labelme", str(out), overwrite=True, **KW)
    assert summary["images"]["train"] == 2
    assert sorted(_snapshot(out)) == ["images/b1.jpg", "images/b2.jpg", "summary.json", "teacher_pool.jsonl",
                                      "train.jsonl", "val.jsonl"]  # no stale a*.jpg
    assert validate_jsonl(out / "train.jsonl") == []
    # the swap would delete the input: refused even with overwrite
    with pytest.raises(ValueError, match="source"):
        convert.convert_dataset(str(raw_b), "labelme", str(raw_b), overwrite=True, **KW)
    assert sorted(p.name for p in raw_b.iterdir()) == ["b1.jpg", "b1.json", "b2.jpg", "b2.json"]


def test_overhanging_box_is_clipped_and_only_the_bad_object_dropped(tmp_path):
    raw = tmp_path / "raw"
    _labelme(raw, "p", [([[-10, 5], [50, 100]], "a/overhang"),
                        ([[120, 10], [150, 20]], "a/outside"),
                        ([[10, 10], [20, 20]], " "),
                        ([[30, 30], [30, 40]], "a/flat"),
                        ([[60, 10], [100, 50]], "a/ok"),
                        ([[-0.5, 0], [W + 0.5, H]], "a/edge")])  # within the tolerance: not counted
    _labelme(raw, "q", [([[1, 1], [30, 30]], "a/ok")])
    summary = convert.convert_dataset(str(raw), "labelme", str(tmp_path / "out"), **KW)
    assert summary["images"]["train"] == 2 and summary["skipped"]["count"] == 0 and summary["objects"] == 4
    (clipped,) = summary["clipped_boxes"]["boxes"]
    assert summary["clipped_boxes"]["count"] == 1 and "p.json: box [-10.0, 5.0, 50.0, 100.0] (a/overhang)" in clipped
    dropped = summary["dropped_objects"]["objects"]
    assert summary["dropped_objects"]["count"] == 3 and all("p.json: box" in d for d in dropped)
    assert ["lies outside the 112x84 image" in dropped[0], "empty desc" in dropped[1],
            "(a/flat) is degenerate" in dropped[2]] == [True] * 3
    (p,) = [r for r in schema.load_records(tmp_path / "out" / "train.jsonl")[0] if r.id == "p"]
    assert [(o.bbox, o.desc) for o in p.student.objects] == [
        ((0, 5, 50, H), "a/overhang"), ((60, 10, 100, 50), "a/ok"), ((0, 0, W, H), "a/edge")]
    # --strict: the photo is a bad record, as before
    with pytest.raises(ValueError, match=r"(?s)1 bad record.*p.json: box \[-10.0, 5.0, 50.0, 100.0\] .*out of the image"):
        convert.convert_dataset(str(raw), "labelme", str(tmp_path / "strict"), strict=True, **KW)
    assert not (tmp_path / "strict").exists()
    summary = convert.convert_dataset(str(raw), "labelme", str(tmp_path / "strict"), strict=True,
                                      skip_bad_samples=True, **KW)
    assert summary["images"]["train"] == 1 and summary["skipped"]["count"] == 1
    assert summary["clipped_boxes"]["count"] == summary["dropped_objects"]["count"] == 0


def test_same_file_name_in_different_folders_keeps_both(tmp_path):
    raw = tmp_path / "raw"
    _labelme(raw / "site1", "p", [([[1, 1], [30, 30]], "a/red")], color=(255, 0, 0))
    _labelme(raw / "site2", "p", [([[2, 2], [40, 40]], "a/blue")], color=(0, 0, 255))
    _labelme(raw / "x", "a", [([[1, 1], [9, 9]], "a/jpg")], color=(0, 255, 0), json_name="a_jpg")
    _labelme(raw / "x", "a", [([[1, 1], [8, 8]], "a/png")], color=(255, 255, 0), ext=".png", json_name="a_png")
    _labelme(raw, "q", [([[1, 1], [9, 9]], "a/q")])
    out = tmp_path / "out"
    summary = convert.convert_dataset(str(raw), "labelme", str(out), **KW)
    assert summary["images"]["train"] == 5 and summary["skipped"]["count"] == 0
    recs = {r.id: r for r in schema.load_records(out / "train.jsonl")[0]}
    assert sorted(recs) == ["q", "site1/p", "site2/p", "x/a.jpg", "x/a.png"]
    assert recs["site1/p"].student.images == (str(out / "images/site1/p.jpg"),)
    assert recs["x/a.png"].student.images == (str(out / "images/x/a.png.png"),)
    for rid, desc, rgb in [("site1/p", "a/red", (255, 0, 0)), ("site2/p", "a/blue", (0, 0, 255)),
                           ("x/a.jpg", "a/jpg", (0, 255, 0)), ("x/a.png", "a/png", (255, 255, 0))]:
        pixels = np.asarray(Image.open(recs[rid].student.images[0]), np.float32).mean((0, 1))
        assert np.abs(pixels - rgb).max() < 8 and recs[rid].student.objects[0].desc == desc
    assert validate_jsonl(out / "train.jsonl") == []
    # one photo annotated by two files is not two photos
    twice = _labelme(tmp_path / "twice", "t", [([[1, 1], [9, 9]], "a/t")])
    (twice.parent / "t_again.json").write_text(twice.read_text())
    with pytest.raises(ValueError, match=r"1 photo\(s\) annotated more than once: .*t.jpg by .*t.json, .*t_again"):
        convert.convert_dataset(str(tmp_path / "twice"), "labelme", str(tmp_path / "out2"), **KW)
    assert not (tmp_path / "out2").exists()


def test_coco_bad_entries_are_named_errors_or_counted_skips(tmp_path):
    raw = tmp_path / "coco"
    (raw / "images").mkdir(parents=True)
    for name in ("a", "c"):
        Image.new("RGB", (W, H), (9, 99, 9)).save(raw / "images" / f"{name}.jpg")
    ann = raw / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2}, 7, {"id": 3, "file_name": "c.jpg"}],
        "categories": [{"id": 1, "name": "screw/loose"}],
        "annotations": [5, {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 40]},
                        {"id": 11, "image_id": 99, "category_id": 1, "bbox": [1, 2, 3, 4]},
                        {"id": 12, "image_id": 99, "category_id": 1, "bbox": [1, 2, 3, 4]},
                        {"id": 13, "image_id": 3, "category_id": 42, "bbox": [1, 2, 3, 4]},
                        {"id": 14, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4]}]}))
    errors = sorted(f"{r.source}: {r.error}" for r in readers.read_raw(str(raw), "coco") if r.error)
    assert errors == sorted([
        f"{ann} (annotations[0]): an annotation must be an object",
        f"{ann} (image_id 99): 2 annotation(s) point at image id 99, which no image has: "
        "annotations[2] (id 11), annotations[3] (id 12)",
        f"{ann} (images[1]): image id 2 has no file_name",
        f"{ann} (images[2]): an image must be an object with an 'id' and a 'file_name'",
        f"{ann} (images[3], id 3): annotations[4] (id 13): category_id 42 is not in categories"])
    with pytest.raises(ValueError, match=r"5 bad record") as e:
        convert.convert_dataset(str(raw), "coco", str(tmp_path / "out"), **KW)
    assert all(err in str(e.value) for err in errors)
    summary = convert.convert_dataset(str(raw), "coco", str(tmp_path / "out"), skip_bad_samples=True, **KW)
    assert summary["skipped"]["records"] == errors and summary["images"]["train"] == 1
    (rec,) = schema.load_records(tmp_path / "out" / "train.jsonl")[0]
    assert rec.id == "a" and [o.bbox for o in rec.student.objects] == [(1, 2, 31, 42)]


def test_teacher_pool_and_pixel_limits_are_checked(tmp_path):
    raw = _raw(tmp_path / "raw", ["a", "b"])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"teacher_pool_size 2 >= the 2 converted record\(s\): train and val"):
        convert.convert_dataset(str(raw), "labelme", str(out), **{**KW, "teacher_pool_size": 2})
    with pytest.raises(ValueError, match="min_pixels <= max_pixels, got min_pixels 3136, max_pixels 3000"):
        convert.convert_dataset(str(raw), "labelme", str(out), **{**KW, "max_pixels": 3000})
    with pytest.raises(ValueError, match="leaves no train record"):
        convert.convert_dataset(str(raw), "labelme", str(out), **{**KW, "val_ratio": 0.9})
    assert not out.exists() and _leftovers(tmp_path) == []


def _ex(name: str) -> schema.Example:
    return schema.Example((f"/img/{name}.png",), ())


def test_teacher_ratio_and_max_teachers_apply_to_records_with_their_own_teachers():
    own = tuple(_ex(f"t{i}") for i in range(3))
    rec = schema.Record(_ex("s"), own, "f.jsonl:1", "r")

    def draws(ratio, max_teachers, record=rec, pool=()):
        return [choose_teachers(record, pool, np.random.default_rng(k), ratio, max_teachers) for k in range(200)]

    assert all(t == () for t in draws(0.0, 3)) and all(t == () for t in draws(1.0, 0))
    assert all(len(t) == 1 and t[0] in own for t in draws(1.0, 1))
    full = draws(1.0, 3)
    assert {len(t) for t in full} == {1, 2, 3}
    assert all([own.index(x) for x in t] == sorted(own.index(x) for x in t) for t in full)  # record's order
    half = draws(0.5, 2)
    assert 0.35 < np.mean([len(t) > 0 for t in half]) < 0.65 and max(len(t) for t in half) == 2
    assert draws(0.5, 2) == half  # a pure function of the rng
    assert all(t == () for t in draws(1.0, 3, schema.Record(_ex("s"), (), "f.jsonl:1", "r")))
    pool = [_ex(f"p{i}") for i in range(4)] + [_ex("s")]  # never the student's own image
    simple = draws(1.0, 2, schema.Record(_ex("s"), None, "f.jsonl:1", "r"), pool)
    assert {len(t) for t in simple} == {1, 2} and not any(_ex("s") in t for t in simple)


def test_student_with_several_images_is_rejected_naming_the_line(tmp_path):
    one, two = ["a.png"], ["a.png", "b.png"]
    lines = [{"images": one, "objects": []},
             {"images": two, "objects": []},
             {"teachers": [{"images": two, "objects": []}], "student": {"images": one, "objects": []}},
             {"teachers": [], "student": {"images": two, "objects": []}},
             {"examples": [], "target": {"images": two, "objects": []}}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records, errors = schema.load_records(path, skip_bad_samples=True)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]  # a teacher may show several
    assert errors == [f"{path}:{n}: {what}.images has 2 images, a student has one: the detection targets and "
                      "the head's vision memory are one image's (make one record per image)"
                      for n, what in [(2, "record"), (4, "student"), (5, "target")]]
    with pytest.raises(schema.RecordError, match=rf"^{path}:2: record.images has 2 images"):
        schema.load_records(path)
