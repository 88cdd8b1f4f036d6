"""Schema, readers, desc normalization, conversion end-to-end, validation (no tokenizer needed)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bbu_jax.data import convert, desc, readers, schema, synthetic
from bbu_jax.data.validate import validate_jsonl
from bbu_jax.models.qwen2_5_vl.processing import smart_resize

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    synthetic.write_labelme_dataset(str(out), num_images=16, seed=3)
    return out


def test_synthetic_is_seeded_and_covers_types(tmp_path, raw_dir):
    synthetic.write_labelme_dataset(str(tmp_path), num_images=16, seed=3)
    a = (raw_dir / "bbu_3_00005.json").read_text()
    assert a == (tmp_path / "bbu_3_00005.json").read_text()
    assert np.array_equal(np.asarray(Image.open(raw_dir / "bbu_3_00005.jpg")),
                          np.asarray(Image.open(tmp_path / "bbu_3_00005.jpg")))
    assert len(synthetic.DESC_TYPES) >= 8
    assert all(len(zh.split("/")) == 3 and len(en.split("/")) == 3 for zh, en in synthetic.DESC_TYPES.items())
    # status is in the pixels: a tight and a loose screw drawn in the same box differ
    rng = np.random.default_rng(0)
    imgs = []
    for tight in (True, False):
        im = Image.new("RGB", (60, 60))
        synthetic._screw(__import__("PIL.ImageDraw").ImageDraw.Draw(im), (5, 5, 55, 55), tight, rng)
        imgs.append(np.asarray(im, np.float32))
    assert np.abs(imgs[0] - imgs[1]).mean() > 30



def test_synthetic_scale_enlarges_scene_and_boxes(tmp_path, raw_dir):
    synthetic.write_labelme_dataset(str(tmp_path), num_images=2, seed=3, scale=2)
    for stem in ("bbu_3_00000", "bbu_3_00001"):
        small, big = (json.loads((d / f"{stem}.json").read_text()) for d in (raw_dir, tmp_path))
        assert (big["imageWidth"], big["imageHeight"]) == (2 * small["imageWidth"], 2 * small["imageHeight"])
        assert Image.open(tmp_path / f"{stem}.jpg").size == (big["imageWidth"], big["imageHeight"])
        assert [s["points"] for s in big["shapes"]] == [[[2 * v for v in p] for p in s["points"]]
                                                        for s in small["shapes"]]
        assert [s["label"] for s in big["shapes"]] == [s["label"] for s in small["shapes"]]
    with pytest.raises(ValueError, match="scale"):
        synthetic.write_labelme_dataset(str(tmp_path), num_images=1, seed=3, scale=0)

def test_normalize_desc_and_map():
    assert desc.normalize_desc("  螺丝连接点 ／BBU安装螺丝、 连接正确 ") == "螺丝连接点/BBU安装螺丝/连接正确"
    assert desc.normalize_desc("ＢＢＵ（主机）/ a  b /") == "BBU(主机)/a b"
    m = desc.DescMap({"螺丝/松动": "screw/loose"})
    assert m.to("螺丝/松动", "en") == "screw/loose" and m.to("screw/loose", "zh") == "螺丝/松动"
    assert m.to("screw/loose", "en") == "screw/loose" and m.to("unknown", "en") is None


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_schema_forms_and_errors(tmp_path):
    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    ex = {"images": ["a.png"], "objects": [{"bbox_2d": [1, 2, 30, 40], "desc": "x/y/z"}]}
    f = _write(tmp_path / "d.jsonl", [json.dumps(ex), json.dumps({"teachers": [ex], "student": ex}),
                                      json.dumps({"examples": [], "target": ex})])
    recs, errors = schema.load_records(f)
    assert not errors and [r.teachers is None for r in recs] == [True, False, False]
    assert recs[1].teachers[0].objects[0].bbox == (1, 2, 30, 40)
    assert recs[0].student.images[0] == str(tmp_path / "a.png")
    bad = [("{not json", "malformed JSON"),
           (json.dumps({"foo": 1}), "unknown record form"),
           (json.dumps({"images": ["a.png"], "objects": [{"bbox_2d": [5, 5, 5, 9], "desc": "a"}]}), "degenerate"),
           (json.dumps({"images": ["a.png"], "objects": [{"bbox_2d": [9, 5, 2, 9], "desc": "a"}]}), "inverted"),
           (json.dumps({"images": ["a.png"], "objects": [{"bbox_2d": [1, 1, 5, 9], "desc": " "}]}), "desc"),
           (json.dumps({"images": [], "objects": []}), "images")]
    f = _write(tmp_path / "bad.jsonl", [json.dumps(ex)] + [b for b, _ in bad])
    with pytest.raises(schema.RecordError, match=rf"{f}:2: malformed JSON"):
        schema.load_records(f)
    recs, errors = schema.load_records(f, skip_bad_samples=True)
    assert len(recs) == 1 and len(errors) == len(bad)
    for k, (err, (_, why)) in enumerate(zip(errors, bad)):
        assert err.startswith(f"{f}:{k + 2}: ") and why in err, err


def test_labelme_and_coco_readers(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "p.jpg")
    (tmp_path / "p.json").write_text(json.dumps({"imagePath": "p.jpg", "shapes": [
        {"label": "a", "shape_type": "rectangle", "points": [[50, 40], [10, 5]]},
        {"label": "b", "shape_type": "polygon", "points": [[1, 2], [30, 4], [20, 25]]},
        {"label": "c", "shape_type": "circle", "points": [[50, 40], [53, 44]]}]}))
    (r,) = readers.read_raw(str(tmp_path), "labelme")
    assert r.error is None and r.image_path == str(tmp_path / "p.jpg")
    assert r.objects == (((10, 5, 50, 40), "a"), ((1, 2, 30, 25), "b"), ((45, 35, 55, 45), "c"))
    coco_dir = tmp_path / "coco"
    (coco_dir / "images").mkdir(parents=True)
    Image.new("RGB", (100, 80)).save(coco_dir / "images" / "q.jpg")
    (coco_dir / "ann.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "q.jpg", "width": 100, "height": 80}],
        "categories": [{"id": 1, "name": "screw/loose"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 40]}]}))
    (r,) = readers.read_raw(str(coco_dir), "coco")
    assert r.objects == (((10, 20, 40, 60), "screw/loose"),) and r.image_path.endswith("images/q.jpg")
    with pytest.raises(ValueError, match="unknown format"):
        readers.read_raw(str(tmp_path), "voc")


def test_scale_box_and_pool():
    assert convert.scale_box((10, 10, 50, 30), (100, 50), (56, 28)) == [6, 6, 28, 17]
    assert convert.scale_box((0, 0, 101, 50), (100, 50), (56, 28)) == [0, 0, 56, 28]  # clamped
    assert convert.scale_box((10, 10, 10.4, 30), (100, 50), (56, 28)) is None
    descs = [{"a"}, {"a", "b"}, {"c"}, {"b", "c", "d"}, {"a"}]
    pool = convert.greedy_teacher_pool(descs, size=2, seed=0)
    assert set().union(*(descs[i] for i in pool)) == {"a", "b", "c", "d"} and len(pool) == 2
    assert convert.greedy_teacher_pool(descs, 2, 0) == convert.greedy_teacher_pool(descs, 2, 0)
    train, val = convert.split_indices(100, 0.2, seed=1)
    assert len(val) == 20 and not set(train) & set(val) and len(train) + len(val) == 100


def test_convert_end_to_end(tmp_path, raw_dir):
    out = tmp_path / "out"
    summary = convert.convert_dataset(str(raw_dir), "labelme", str(out), min_pixels=3136, max_pixels=56 * 56 * 16,
                                      val_ratio=0.25, teacher_pool_size=4, seed=0, language="en", progress=False)
    assert summary["images"]["teacher_pool"] == 4 and sum(summary["images"].values()) == 16
    assert summary["skipped"]["count"] == 0 and not summary["teacher_pool_uncovered_descs"]
    assert summary["unmapped_descs"] == [] and sum(summary["per_desc"].values()) == summary["objects"]
    descs_en = set(synthetic.DESC_TYPES.values())
    all_ids = []
    for split in ("train", "val", "teacher_pool"):
        assert validate_jsonl(out / f"{split}.jsonl") == []
        recs, _ = schema.load_records(out / f"{split}.jsonl")
        all_ids += [r.id for r in recs]
        for r in recs:
            raw = json.loads((raw_dir / f"{r.id}.json").read_text())
            im = Image.open(r.student.images[0])
            h, w = smart_resize(raw["imageHeight"], raw["imageWidth"], min_pixels=3136, max_pixels=56 * 56 * 16)
            assert im.size == (w, h) and r.orig_size == (raw["imageHeight"], raw["imageWidth"])
            for o, shape in zip(r.student.objects, raw["shapes"]):
                (x1, y1), (x2, y2) = shape["points"]
                sx, sy = w / raw["imageWidth"], h / raw["imageHeight"]
                assert np.allclose(o.bbox, [x1 * sx, y1 * sy, x2 * sx, y2 * sy], atol=0.5)
                assert o.desc in descs_en
    assert sorted(all_ids) == sorted(f"bbu_3_{i:05d}" for i in range(16))
    pool_descs = {o.desc for r in schema.load_records(out / "teacher_pool.jsonl")[0] for o in r.student.objects}
    train_descs = {o.desc for s in ("train", "val") for r in schema.load_records(out / f"{s}.jsonl")[0]
                   for o in r.student.objects}
    assert train_descs <= pool_descs
    # deterministic, also with workers
    out2 = tmp_path / "out2"
    convert.convert_dataset(str(raw_dir), "labelme", str(out2), min_pixels=3136, max_pixels=56 * 56 * 16,
                            val_ratio=0.25, teacher_pool_size=4, seed=0, language="en", num_workers=2,
                            progress=False)
    for split in ("train", "val", "teacher_pool"):
        assert (out / f"{split}.jsonl").read_text() == (out2 / f"{split}.jsonl").read_text()


def test_convert_bad_input_and_cli(tmp_path, raw_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    for stem in ("bbu_3_00000", "bbu_3_00001", "bbu_3_00002"):
        for ext in (".json", ".jpg"):
            (raw / f"{stem}{ext}").write_bytes((raw_dir / f"{stem}{ext}").read_bytes())
    ann = json.loads((raw / "bbu_3_00001.json").read_text())
    ann["shapes"].append({"label": "x/y/z", "shape_type": "rectangle", "points": [[0, 0], [5000, 10]]})
    (raw / "bbu_3_00001.json").write_text(json.dumps(ann))
    (raw / "bbu_3_00002.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"(?s)2 bad record.*bbu_3_00001.json: box .* out of the image bounds"):
        convert.convert_dataset(str(raw), "labelme", str(tmp_path / "o"), min_pixels=3136, max_pixels=200704,
                                val_ratio=0.0, teacher_pool_size=1, seed=0, strict=True, progress=False)
    with pytest.raises(ValueError, match=r"(?s)^1 bad record.*bbu_3_00002.jpg: cannot identify"):
        convert.convert_dataset(str(raw), "labelme", str(tmp_path / "o"), min_pixels=3136, max_pixels=200704,
                                val_ratio=0.0, teacher_pool_size=1, seed=0, progress=False)
    cmd = [sys.executable, str(ROOT / "scripts/convert_dataset.py"), "--input_dir", str(raw), "--format",
           "labelme", "--output_dir", str(tmp_path / "o"), "--min_pixels", "3136", "--max_pixels", "200704",
           "--val_ratio", "0", "--teacher_pool_size", "1", "--seed", "0", "--skip_bad_samples",
           "--num_workers", "0"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["skipped"]["count"] == 1 and summary["images"] == {"train": 1, "val": 0, "teacher_pool": 1}
    assert summary["clipped_boxes"]["count"] == 1 and "bbu_3_00001.json" in summary["clipped_boxes"]["boxes"][0]
    assert any("bbu_3_00002" in s and "cannot identify" in s for s in summary["skipped"]["records"])
    # validate_dataset.py: ok -> 0; broken -> FILE:LINE lines and 1
    val = [sys.executable, str(ROOT / "scripts/validate_dataset.py")]
    assert subprocess.run(val + [str(tmp_path / "o" / "teacher_pool.jsonl")], env=env).returncode == 0
    good = (tmp_path / "o" / "teacher_pool.jsonl").read_text().strip()
    rec = json.loads(good)
    rec["objects"].append({"bbox_2d": [0, 0, 9999, 5], "desc": "a"})
    missing = dict(rec, images=["images/nope.jpg"])
    bad = _write(tmp_path / "o" / "bad.jsonl", [good, json.dumps(rec), "[1", json.dumps(missing)])
    res = subprocess.run(val + [str(bad)], capture_output=True, text=True, env=env)
    assert res.returncode == 1
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith(f"{bad}:2: ") and "out of bounds" in lines[0]
    assert lines[1].startswith(f"{bad}:3: malformed JSON")
    assert lines[2].startswith(f"{bad}:4: ") and "cannot read image" in lines[2] and len(lines) == 3
