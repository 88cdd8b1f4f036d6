"""Bad input and faults around a run and its inference (issue 17): --validate_only reads every line
the run will read, model folders are local only and checked, outputs are checked writable before
the work, any generated text can be written, and a detection head is refused beside another model."""
import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.schema import RecordError
from bbu_jax.evaluation import visualize
from bbu_jax.foundation.files import check_writable, write_jsonl_atomic
from bbu_jax.inference.parser import parse_response
from bbu_jax.models import detection_head_files as head_files
from bbu_jax.models.detection_head import DetectionHead, HeadSpec
from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig, from_hf
from bbu_jax.workflows import data_checks
from bbu_jax.workflows.config import build_specs, load_config

ROOT = Path(__file__).resolve().parents[1]
PIX = dict(min_pixels=3136, max_pixels=50176)  # small images, as the demo's
HEAD = HeadSpec(width=32, num_queries=4, num_layers=1, num_heads=2, mlp_dim=64, caption_layers=1,
                max_caption_len=8)
GOOD = {"images": ["a.png"], "objects": [{"bbox_2d": [2, 2, 30, 30], "desc": "screw"}]}


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path: Path, *lines) -> Path:
    """Each line a record (dumped) or raw text (a str)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    Image.fromarray(np.full((56, 56, 3), 120, np.uint8)).save(root / "a.png")
    _jsonl(root / "train.jsonl", GOOD, GOOD)
    _jsonl(root / "val.jsonl", GOOD)
    _jsonl(root / "pool.jsonl", GOOD)
    return root


def _specs(data: Path, **data_fields):
    specs = build_specs(load_config(ROOT / "configs" / "demo.py"))
    fields = dict(train_jsonl=str(data / "train.jsonl"), val_jsonl=str(data / "val.jsonl"),
                  teacher_pool_jsonl=str(data / "pool.jsonl"), skip_bad_samples=False, **PIX)
    return dataclasses.replace(specs, data=dataclasses.replace(specs.data, **{**fields, **data_fields}))


def _train_script(tmp: Path, config: str, *overrides: str) -> subprocess.CompletedProcess:
    """scripts/train.py --validate_only as a user starts it: one CPU device, and the hub reachable
    as far as the environment goes (no offline switch)."""
    drop = ("XLA_FLAGS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / config),
            f"--config.run.workdir={tmp / 'run'}", *overrides, "--validate_only"]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)


# ----------------------------------------------------------------------------- --validate_only
def test_validate_only_reads_every_train_line(data, tiny_hf_dir, tmp_path):
    """A malformed line used to pass --validate_only ("config OK") when budgets were not checked on
    start, and crash the real run later."""
    train = _jsonl(tmp_path / "train.jsonl", GOOD | {"images": [str(data / "a.png")]}, '{"images": [')
    out = _train_script(tmp_path, "demo.py", f"--config.model.hf_dir={tiny_hf_dir}",
                        f"--config.data.train_jsonl={train}", "--config.data.val_jsonl=",
                        "--config.data.teacher_pool_jsonl=", "--config.data.skip_bad_samples=False",
                        "--config.data.check_budgets_on_start=False")
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    assert "config OK" not in out.stdout
    assert out.stderr.strip().splitlines()[-1].startswith(f"{train}:2: malformed JSON")


def test_missing_hf_dir_fails_at_once_without_the_hub(tmp_path):
    """base.py's hf_dir, missing, is shaped like a hub id: transformers used to look it up on the
    hub (over a minute offline) before failing."""
    out = _train_script(tmp_path, "base.py", "--config.mesh.fsdp=1")
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("models/Qwen2.5-VL-3B-Instruct: no such folder"), out.stderr[-2000:]
    assert "huggingface" not in out.stderr.lower()


def test_every_file_is_read_with_the_skip_rule(data, tmp_path, caplog):
    bad = '{"images": ["a.png"], "objects": [{"bbox_2d": [5, 5, 1, 1], "desc": "x"}]}'
    for key, name in (("val_jsonl", "val.jsonl"), ("teacher_pool_jsonl", "pool.jsonl")):
        shutil.copy(data / "a.png", tmp_path / "a.png")
        path = _jsonl(tmp_path / name, GOOD, bad)
        with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:2: .*degenerate"):
            data_checks.read_data_files(_specs(data, **{key: str(path)}))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            files = data_checks.read_data_files(_specs(data, **{key: str(path)}, skip_bad_samples=True))
        assert len(files[key]) == 1 and f"{path}: 1 of 2" in caplog.text


def test_empty_or_all_skipped_train_is_one_clear_error(data, tiny_hf_dir, tmp_path):
    """An empty train file used to end in KeyError 'token_budget'."""
    encoder = SampleEncoder(str(tiny_hf_dir), language="en", **PIX)
    empty = str(_jsonl(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no usable train records (the file is empty)")):
        data_checks.check_data(_specs(data, train_jsonl=empty), encoder)
    bad = str(_jsonl(tmp_path / "bad.jsonl", "not json", {"images": []}))
    with pytest.raises(ValueError, match=re.escape(f"{bad}: no usable train records (all 2 skipped as bad, the "
                                                   f"first: {bad}:1: malformed JSON")):
        data_checks.check_data(_specs(data, train_jsonl=bad, skip_bad_samples=True), encoder)
    unreadable = str(_jsonl(tmp_path / "unreadable.jsonl", GOOD | {"images": ["missing.png"]}))
    with pytest.raises(RecordError, match=rf"^{re.escape(unreadable)}:1: cannot read image"):
        data_checks.check_data(_specs(data, train_jsonl=unreadable), encoder)
    with pytest.raises(ValueError, match=rf"^{re.escape(unreadable)}: no usable train samples"):
        data_checks.check_data(_specs(data, train_jsonl=str(unreadable), skip_bad_samples=True), encoder)
    data_checks.check_data(_specs(data), encoder)  # the good data pass


# ----------------------------------------------------------------------------- model folders
def test_model_folder_is_local_and_checked(tiny_hf_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub_id = "models/Qwen2.5-VL-3B-Instruct"
    for load in (lambda d: SampleEncoder(d, language="en", **PIX), from_hf):
        with pytest.raises(FileNotFoundError, match=rf"^{hub_id}: no such folder"):
            load(hub_id)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="^empty: config.json not found"):
        SampleEncoder("empty", language="en", **PIX)  # was transformers' "install sentencepiece"
    shutil.copy(tiny_hf_dir / "config.json", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"^empty: no tokenizer files \(tokenizer.json"):
        SampleEncoder("empty", language="en", **PIX)
    llama = shutil.copytree(tiny_hf_dir, tmp_path / "llama")
    (llama / "config.json").write_text(json.dumps({**json.loads((llama / "config.json").read_text()),
                                                    "model_type": "llama"}))
    for load in (lambda d: SampleEncoder(d, language="en", **PIX), from_hf):
        with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
            load(str(llama))


# ----------------------------------------------------------------------------- outputs
@pytest.fixture(scope="module")
def infer():
    return _script("infer")


def test_outputs_are_checked_writable_before_the_work(data, infer, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=f"{blocker} is a file, not a folder"):
        check_writable(blocker / "out" / "preds.jsonl")
    with pytest.raises(IsADirectoryError):
        check_writable(tmp_path)
    made = check_writable(tmp_path / "new" / "preds.jsonl")
    assert made.parent.is_dir() and os.listdir(made.parent) == []  # the test file is gone
    # The model path does not exist either: the output is what fails first, before any work.
    rc = infer.main(["--model", str(tmp_path / "no_model"), "--data", str(data / "val.jsonl"),
                     "--output", str(blocker / "preds.jsonl")])
    assert rc == 1 and "is a file, not a folder" in capsys.readouterr().err
    rc = _script("evaluate").main(["--model", str(tmp_path / "no_model"), "--data", str(data / "val.jsonl"),
                                   "--output", str(blocker / "report")])
    assert rc == 1 and "is a file, not a folder" in capsys.readouterr().err


def test_a_lone_surrogate_cannot_break_the_predictions(data, tiny_hf_dir, infer, tmp_path, monkeypatch):
    """A generated desc "\\ud800" (json.loads makes a lone surrogate of it) used to crash the final
    write and lose every prediction."""
    response = '[{"bbox_2d": [1, 2, 30, 40], "desc": "\\ud800"}]'
    pred, status = parse_response(response, (56, 56), (56, 56))
    assert pred[0]["desc"] == "\ud800"
    from bbu_jax.inference import answers

    def fake_generate(model, encoder, records, pool, **kw):
        return [answers.Answer(r, response + "\ud800", [], pred, status) for r in records], []

    monkeypatch.setattr(answers, "generate_answers", fake_generate)
    out = tmp_path / "preds.jsonl"
    assert infer.main(["--model", str(tiny_hf_dir), "--data", str(data / "val.jsonl"),
                       "--output", str(out), "--num_teachers", "0", "--language", "en"]) == 0
    row = json.loads(out.read_bytes().decode("utf-8"))  # valid UTF-8 and JSON
    assert row["pred"][0]["desc"] == "\ud800" and row["response"].endswith("\ud800")
    records, _ = visualize.load_records(out)  # what scripts/visualize.py reads and draws
    visualize.write_visualizations(records, tmp_path / "viz", panel_size=64)
    write_jsonl_atomic(tmp_path / "x.jsonl", [{"desc": "\ud800中\\"}])
    assert json.loads((tmp_path / "x.jsonl").read_text(encoding="utf-8")) == {"desc": "\ud800中\\"}


# ----------------------------------------------------------------------------- the head's model
def _head(llm_hidden: int) -> DetectionHead:
    return DetectionHead(HEAD, llm_hidden=llm_hidden, rngs=nnx.Rngs(0))


def test_head_is_refused_beside_another_model(tiny_hf_dir, tmp_path):
    own = shutil.copytree(tiny_hf_dir, tmp_path / "own")
    head_files.save_detection_head(_head(64), own, np.array([3, 9]))
    assert "norms_sha256" in json.loads((own / head_files.CONFIG).read_text())["model"]
    head_files.check_detection_head(own)

    # A bfloat16 copy of the same weights is the same model.
    bf16 = shutil.copytree(own, tmp_path / "bf16")
    import ml_dtypes
    weights = load_file(str(bf16 / "model.safetensors"))
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}, str(bf16 / "model.safetensors"))
    head_files.check_detection_head(bf16)

    # Same shapes, other weights: used to give plausible numbers.
    other = shutil.copytree(own, tmp_path / "other")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.1
    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"{other / head_files.CONFIG}: the head was trained on another "
                                                   f"model than {other} (other weights)")):
        head_files.check_detection_head(other)
    with pytest.raises(ValueError, match=r"\(other weights\)"):  # the head named apart from the model
        head_files.check_detection_head(own, other)


def test_head_of_another_width_and_old_files(data, tiny_hf_dir, tmp_path, capsys):
    """A head of another width used to fail in a dot_general TypeError."""
    old = tmp_path / "old"  # no config.json beside it: saved without a fingerprint, as older files are
    old.mkdir()
    head_files.save_detection_head(_head(32), old, np.array([3, 9]))
    wrong = shutil.copytree(tiny_hf_dir, tmp_path / "wrong")
    for name in (head_files.WEIGHTS, head_files.CONFIG):
        shutil.copy(old / name, wrong / name)
    with pytest.raises(ValueError, match=r"another model than .*\(it reads 32-wide hidden states, the model's "
                                         r"are 64 wide\)"):
        head_files.check_detection_head(wrong)
    config = Qwen25VLConfig.from_file(tiny_hf_dir / "config.json")
    with pytest.raises(ValueError, match="32-wide hidden states but the model's are 64 wide"):
        head_files.check_head_fits_model(_head(32), config, np.array([3, 9]))  # predict_detection's entry
    rc = _script("evaluate").main(["--model", str(wrong), "--data", str(data / "val.jsonl"),
                                   "--output", str(tmp_path / "r"), "--mode", "head", "--language", "en"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # the warning that the folder has no training settings, then the error
    assert rc == 1 and lines[-1].startswith("error:") and "32-wide" in lines[-1] and len(lines) <= 2
    assert not (tmp_path / "r" / "report.json").exists()

    fits = shutil.copytree(tiny_hf_dir, tmp_path / "fits")
    head_files.save_detection_head(_head(64), old, np.array([3, 9]))
    for name in (head_files.WEIGHTS, head_files.CONFIG):
        shutil.copy(old / name, fits / name)
    head, vocab = head_files.load_detection_head(fits)  # old files still load
    assert head.llm_hidden == 64 and vocab.tolist() == [3, 9]
    with pytest.warns(UserWarning, match="records no model fingerprint"):
        head_files.check_detection_head(fits)
