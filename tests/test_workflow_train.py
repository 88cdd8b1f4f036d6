"""The training run as a user starts it: scripts/train.py on the demo config at a tiny size makes
its assets, checks budgets, trains, evaluates (losses, head metrics, generated answers),
checkpoints and exports; --validate_only stops before the model. Then the artifacts as a user
takes them: a mid-run checkpoint exported with flax_to_hf and loaded by transformers, infer with no
settings flags, and the Predictor on paths, PIL images and arrays."""
import json
import os
import pathlib
import runpy
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(tmp: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a laptop
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "demo.py"),
            f"--config.run.workdir={tmp / 'run'}", f"--config.model.hf_dir={tmp / 'tiny'}",
            f"--config.data.train_jsonl={tmp / 'data' / 'train.jsonl'}",
            f"--config.data.val_jsonl={tmp / 'data' / 'val.jsonl'}",
            f"--config.data.teacher_pool_jsonl={tmp / 'data' / 'teacher_pool.jsonl'}",
            "--config.demo.synthetic_num_images=12", "--config.demo.synthetic_teacher_pool_size=2",
            "--config.demo.synthetic_val_ratio=0.2", "--config.run.num_train_steps=4",
            "--config.optim.warmup_steps=1", "--config.eval.every=4", "--config.checkpoint.every=2",
            "--config.eval.generate_max_new_tokens=16",
            # smaller images than the demo's (fewer patches to compile and run; the sizes themselves are
            # not what these tests check, only that they travel with the checkpoint and the export)
            "--config.data.max_pixels=50176", "--config.data.patch_budget=1024", "--config.data.token_budget=1024",
            "--config.data.vision_memory_tokens=64", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=tmp)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workflow")
    out = _train(tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp


def test_run_trains_evaluates_checkpoints_and_exports(run):
    summary = json.loads((run / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "done" and summary["step"] == 4
    for key in ("val/loss", "val/lm_loss", "val/bbox_l1_loss", "val/bbox_l1_loss_aux", "val/head/box_AP50",
                "val/head/type_mAP50", "val/generate/f1", "val/generate/precision", "val/generate/recall",
                "val/generate/complete_json", "train/lm_loss", "train/mfu", "wall_time_s"):
        assert key in summary, key
    assert summary["versions"]["jax"] and summary["versions"]["bbu_jax"]
    assert summary["last_checkpoint"].endswith(os.path.join("checkpoints", "4"))
    export = pathlib.Path(summary["hf_export"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "detection_head.safetensors",
                 "detection_head_config.json", "bbu_jax_settings.json", "README.md", "generation_config.json"):
        assert (export / name).is_file(), name
    rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/lm_loss" in r] == [4]
    logged = {k for r in rows for k in r} - {"step"}
    assert logged <= set(summary)  # summary.json holds the final value of every metric
    assert not {k for k in logged if k.startswith("val/")} & {"val/mAP", "val/mAP50", "val/head/AP50"}


def _scalar_tags(folder: pathlib.Path) -> set[str]:
    """Tags of the scalars in TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for f in folder.glob("events.out.tfevents.*"):
        data, i = f.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            tags |= {v.tag for v in event.summary.value if v.HasField("simple_value")}
            i += 12 + n + 4
    return tags


def test_tensorboard_tags_equal_the_metrics_keys(run):
    rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    finite = {k for r in rows for k, v in r.items() if k != "step" and v == v}
    assert any("/AP50/" in k for k in finite) and _scalar_tags(run / "run" / "tensorboard") == finite


@pytest.fixture(scope="module")
def mid_run_export(run):
    """checkpoints/2 of the 4-step run, exported as a user would: no flags but where to and from."""
    from convert_weights import flax_to_hf

    out = run / "export_2"
    assert flax_to_hf.main(["--checkpoint", str(run / "run" / "checkpoints" / "2"), "--out", str(out)]) == 0
    return out


def test_mid_run_checkpoint_exports_and_transformers_loads_it(run, mid_run_export):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    # what AutoImageProcessor gives without torchvision (transformers 5.24), named: 5.17 needs torchvision for it
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from bbu_jax.inference import Predictor
    from bbu_jax.inference.settings import Settings
    from bbu_jax.models.qwen2_5_vl import hf_forward
    from bbu_jax.testing.hf_reference import processor_inputs, torch_logits

    settings = Settings.read(mid_run_export)
    assert settings.step == 2 and settings.language == "en" and settings.max_pixels == 50176
    processor = Qwen2VLImageProcessorPil.from_pretrained(mid_run_export, local_files_only=True)
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (3136, 50176)
    assert "mm_token_type_ids" in (mid_run_export / "README.md").read_text()
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        mid_run_export, dtype=torch.float32, output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    image = next((run / "data" / "images").iterdir())
    inputs = processor_inputs(mid_run_export, ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                                               "hello BBU<|im_end|>\n"], [[str(image)]])  # its processor's limits
    ours = hf_forward(Predictor.from_pretrained(run / "run" / "checkpoints" / "2").model, **inputs)
    theirs = torch_logits(model.eval(), inputs)
    valid = inputs["attention_mask"].astype(bool)
    rel = np.linalg.norm(ours[valid] - theirs[valid]) / np.linalg.norm(theirs[valid])
    print(f"logits rel. error, checkpoint step vs transformers on its export: {rel:.2e}")
    assert rel < 1e-5
    with pytest.raises(FileExistsError):  # the export is the user's: replaced only with --overwrite
        from bbu_jax.workflows.export import export_checkpoint
        export_checkpoint(run / "run" / "checkpoints" / "2", mid_run_export)


def test_infer_needs_no_settings_flags(run, mid_run_export, tmp_path, capsys):
    infer = runpy.run_path(str(ROOT / "scripts" / "infer.py"))["main"]
    settings = ["--language", "en", "--min_pixels", "3136", "--max_pixels", "50176", "--num_teachers", "1",
                "--teacher_pool", str(run / "data" / "teacher_pool.jsonl")]
    outs = []
    for extra in ([], settings):
        outs.append(tmp_path / f"preds{len(extra)}.jsonl")
        assert infer(["--model", str(mid_run_export), "--data", str(run / "data" / "val.jsonl"),
                      "--output", str(outs[-1]), "--max_new_tokens", "12", *extra]) == 0
        assert "differs from the trained" not in capsys.readouterr().err
    rows = [[json.loads(line) for line in out.read_text().splitlines()] for out in outs]
    assert rows[0] == rows[1] and rows[0]


def test_predictor_takes_paths_pil_and_arrays_in_original_pixels(run, tmp_path):
    from PIL import Image

    from bbu_jax.inference import Predictor

    predictor = Predictor.from_pretrained(run / "run")  # the newest checkpoint, step 4
    assert predictor.trained.settings.step == 4
    path = next((run / "data" / "images").iterdir())
    with Image.open(path) as im:
        pil = im.convert("RGB")
    big = pil.resize((pil.width * 2, pil.height * 2), Image.NEAREST)
    big.save(tmp_path / "big.png")
    out = predictor.detect([str(path), pil, np.asarray(pil), str(tmp_path / "big.png")], score_threshold=0.0,
                           top_k=4)
    boxes = [np.asarray([o["bbox_2d"] for o in dets]) for dets in out]
    np.testing.assert_allclose(boxes[1], boxes[0], rtol=1e-5)
    np.testing.assert_allclose(boxes[2], boxes[0], rtol=1e-5)
    ratio = boxes[3].mean() / boxes[0].mean()  # pixels of the twice-as-large image as given
    assert 1.8 < ratio < 2.2, ratio
    for dets in out:
        assert len(dets) == 4 and {"bbox_2d", "desc", "score"} == set(dets[0])
    answer = predictor.generate([pil], max_new_tokens=8)[0]
    assert {"objects", "text", "parse_status"} == set(answer)


def test_validate_only_stops_before_the_model(run):
    out = _train(run, "--validate_only")
    assert out.returncode == 0 and "config OK (1 devices)" in out.stdout, out.stderr[-2000:]


def test_a_run_whose_newest_step_is_unreadable_loads_and_exports_the_one_before(run, tmp_path, caplog):
    import shutil

    from bbu_jax.inference import Predictor
    from bbu_jax.inference.settings import Settings
    from bbu_jax.workflows.export import export_checkpoint

    copy = shutil.copytree(run / "run", tmp_path / "run", ignore=shutil.ignore_patterns("hf_export"))
    for f in (copy / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"cut short")
    assert Predictor.from_pretrained(copy).trained.settings.step == 2
    assert "checkpoint" in caplog.text and "unreadable" in caplog.text
    export_checkpoint(copy, tmp_path / "out")
    assert Settings.read(tmp_path / "out").step == 2
    assert (copy / "checkpoints" / "4").is_dir()  # reading never moves or deletes the user's files
