"""scripts/infer.py end to end on the tiny checkpoint: predictions file format, teachers, summary."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbu_jax.data.schema import load_records
from bbu_jax.evaluation import visualize
from bbu_jax.inference.answers import pick_teachers

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("infer_script", ROOT / "scripts" / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


infer = load_script()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 val records (one with orig_size twice the stored size, one with its own teacher) + a pool."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(112, 140), (56, 84), (84, 112), (56, 56)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    obj = {"bbox_2d": [4, 8, 40, 50], "desc": "screw/BBU mounting screw/tight"}
    val = [
        {"id": "a", "images": ["images/0.png"], "objects": [obj], "orig_size": [224, 280]},
        {"id": "b", "images": ["images/1.png"], "objects": []},
        {"id": "c", "teachers": [{"images": ["images/3.png"], "objects": [obj]}],
         "student": {"images": ["images/2.png"], "objects": [obj]}},
    ]
    pool = [{"images": ["images/3.png"], "objects": [obj]}, {"images": ["images/0.png"], "objects": [obj]}]
    for name, recs in (("val.jsonl", val), ("pool.jsonl", pool)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def test_pick_teachers_excludes_student_and_prefers_own(dataset):
    records, _ = load_records(dataset / "val.jsonl")
    pool = [r.student for r in load_records(dataset / "pool.jsonl")[0]]
    rng = np.random.default_rng(0)
    chosen = pick_teachers(records[0], pool, 2, rng)  # pool[1] shows the student's image
    assert [t.images for t in chosen] == [pool[0].images]
    assert pick_teachers(records[2], pool, 1, rng) == records[2].teachers
    assert pick_teachers(records[0], pool, 0, rng) == ()


def test_infer_writes_predictions(dataset, tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "preds" / "preds.jsonl"  # the folder is created
    rc = infer.main(["--model", str(tiny_hf_dir), "--data", str(dataset / "val.jsonl"),
                     "--output", str(out), "--teacher_pool", str(dataset / "pool.jsonl"),
                     "--num_teachers", "1", "--max_samples", "3", "--max_new_tokens", "8", "--language", "en",
                     "--max_pixels", "20000", "--batch_size", "2"])
    assert rc == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["a", "b", "c"]
    for r in lines:
        assert set(r) == {"id", "images", "gt", "pred", "response", "parse_status"}
        assert (out.parent / r["images"][0]).resolve().is_file()
        assert isinstance(r["response"], str) and r["parse_status"]["code"]
    assert lines[0]["gt"][0]["bbox_2d"] == [4, 8, 40, 50]  # the stored image's frame, orig_size or not
    assert lines[2]["gt"][0]["bbox_2d"] == [4, 8, 40, 50]
    assert sorted(os.listdir(out.parent)) == ["preds.jsonl"]  # no temp file left behind
    printed = capsys.readouterr().out
    assert "parse failures" in printed and "generate/f1" in printed
    records, _ = visualize.load_records(out)  # the file is what scripts/visualize.py reads
    assert len(records) == 3


def test_infer_no_usable_records(dataset, tiny_hf_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"images": ["missing.png"], "objects": []}) + "\n")
    rc = infer.main(["--model", str(tiny_hf_dir), "--data", str(bad), "--output",
                     str(tmp_path / "o.jsonl"), "--num_teachers", "0", "--skip_bad_samples"])
    assert rc == 1
    assert not (tmp_path / "o.jsonl").exists()
