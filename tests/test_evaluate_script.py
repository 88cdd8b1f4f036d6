"""scripts/evaluate.py on an export folder (HF files + detection head), and the head's files."""
import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bbu_jax.data import convert, synthetic
from bbu_jax.data.encode import SampleEncoder, build_caption_vocab
from bbu_jax.models.detection_head import DetectionHead, HeadSpec
from bbu_jax.models.detection_head_files import load_detection_head, save_detection_head
from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig
from bbu_jax.workflows.config import build_specs, load_config
from bbu_jax.workflows.train import run_settings

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
evaluate_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate_script)

PIX = ["--min_pixels", "3136", "--max_pixels", str(56 * 56 * 8)]
HEAD = HeadSpec(width=32, num_queries=8, num_layers=2, num_heads=2, mlp_dim=64, caption_layers=1,
                max_caption_len=32)


@pytest.fixture(scope="module")
def export(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    synthetic.write_labelme_dataset(str(root / "raw"), num_images=8, seed=3)
    convert.convert_dataset(str(root / "raw"), "labelme", str(root / "data"), min_pixels=3136,
                            max_pixels=56 * 56 * 8, val_ratio=0.5, teacher_pool_size=1, seed=0,
                            language="en", progress=False)
    run = root / "run"
    shutil.copytree(tiny_hf_dir, run / "hf_export")
    tok = SampleEncoder(str(tiny_hf_dir), min_pixels=3136, max_pixels=56 * 56 * 8, language="en").tokenizer
    vocab = build_caption_vocab([str(root / "data" / "train.jsonl"), str(root / "data" / "val.jsonl")], tok)
    save_detection_head(DetectionHead(HEAD, llm_hidden=64, rngs=nnx.Rngs(1)), run / "hf_export", vocab)
    # the settings a training run records beside its export: the scripts need no settings flags
    specs = build_specs(load_config(ROOT / "configs" / "demo.py"))
    data = dataclasses.replace(specs.data, language="en", min_pixels=3136, max_pixels=56 * 56 * 8,
                               train_jsonl=str(root / "data" / "train.jsonl"), teacher_pool_jsonl="")
    specs = dataclasses.replace(specs, data=data, head=HEAD)
    encoder = SampleEncoder(str(tiny_hf_dir), min_pixels=3136, max_pixels=56 * 56 * 8, language="en")
    config = Qwen25VLConfig.from_file(tiny_hf_dir / "config.json")
    run_settings(specs, encoder, vocab, config).write(run / "hf_export")
    return root


def test_head_files_roundtrip_and_errors(tmp_path):
    head = DetectionHead(HEAD, llm_hidden=64, rngs=nnx.Rngs(2))
    save_detection_head(head, tmp_path, np.array([3, 9]))
    loaded, vocab = load_detection_head(tmp_path)
    assert vocab.tolist() == [3, 9]
    for a, b in zip(jax.tree.leaves(nnx.state(head, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    config = json.loads((tmp_path / "detection_head_config.json").read_text())
    (tmp_path / "detection_head_config.json").write_text(json.dumps({**config, "width": 16}))
    with pytest.raises(ValueError, match="has shape"):
        load_detection_head(tmp_path)
    (tmp_path / "detection_head_config.json").write_text(json.dumps({**config, "depth": 2}))
    with pytest.raises(ValueError, match=r"detection_head_config.json: .*unknown keys \['depth'\]"):
        load_detection_head(tmp_path)
    with pytest.raises(FileNotFoundError, match="no detection head"):
        load_detection_head(tmp_path / "missing")


def test_evaluate_both_modes(export, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["--model", str(export / "run"), "--data", str(export / "data" / "val.jsonl"), "--output", str(out),
            "--mode", "both", "--batch_size", "2", "--max_new_tokens", "8", "--top_k", "5"]
    assert evaluate_script.main(args) == 0  # no settings flags: the export's settings
    report = json.loads((out / "report.json").read_text())  # valid JSON (NaN written as null)
    for key in ("head/box_AP", "head/box_AP50", "head/box_AR100", "head/type_mAP50", "generate/precision",
                "generate/recall", "generate/f1", "generate/complete_json", "generate/caption_accuracy",
                "generate/parse_failures", "lm_loss", "bbox_giou_loss"):
        assert key in report, key
    assert report["num_records"] == 4
    printed = capsys.readouterr()
    assert "head/box_AP50" in printed.out and "differs from the trained" not in printed.err
    from bbu_jax.evaluation import visualize
    for name in ("head_predictions.jsonl", "generate_predictions.jsonl"):
        recs, _ = visualize.load_records(out / name)
        assert len(recs) == 4
    assert evaluate_script.main(args) == 1  # the outputs exist: replaced only with --overwrite
    assert "pass --overwrite" in capsys.readouterr().err


def test_overrides_equal_to_the_trained_values_say_nothing(export, caplog):
    from bbu_jax.inference import Predictor

    Predictor.from_pretrained(export / "run", language="en", min_pixels=3136, max_pixels=56 * 56 * 8)
    assert "differs from the trained" not in caplog.text
    Predictor.from_pretrained(export / "run", max_pixels=56 * 56 * 4)
    assert "max_pixels 12544 differs from the trained max_pixels 25088" in caplog.text


def test_generate_only_leaves_head_keys_out(export, tmp_path, capsys):
    out = tmp_path / "report"
    evaluate_script.main(["--model", str(export / "run" / "hf_export"), "--data",
                          str(export / "data" / "val.jsonl"), "--output", str(out), "--mode", "generate",
                          "--language", "zh", "--batch_size", "2", "--max_new_tokens", "4"])
    report = json.loads((out / "report.json").read_text())
    assert "generate/f1" in report and not any(k.startswith("head/") for k in report)
    assert "language 'zh' differs from the trained language 'en'" in capsys.readouterr().err
