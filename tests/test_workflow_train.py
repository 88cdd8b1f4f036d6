"""The training run as a user starts it: scripts/train.py on the demo config at a tiny size makes
its assets, checks budgets, trains, evaluates (losses and head metrics in one pass), checkpoints
and exports; --validate_only stops before the model."""
import json
import os
import pathlib
import subprocess
import sys

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
            "--config.demo.synthetic_val_ratio=0.2", "--config.run.num_train_steps=2",
            "--config.optim.warmup_steps=1", "--config.eval.every=2", "--config.checkpoint.every=2", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=tmp)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workflow")
    out = _train(tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp


def test_run_trains_evaluates_checkpoints_and_exports(run):
    summary = json.loads((run / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "done" and summary["step"] == 2
    for key in ("val/loss", "val/lm_loss", "val/bbox_l1_loss", "val/bbox_l1_loss_aux", "val/head/AP50",
                "train/lm_loss", "train/mfu"):
        assert key in summary, key
    assert summary["last_checkpoint"].endswith(os.path.join("checkpoints", "2"))
    export = pathlib.Path(summary["hf_export"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "detection_head.safetensors",
                 "detection_head_config.json"):
        assert (export / name).is_file(), name
    rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/lm_loss" in r] == [2]


def test_validate_only_stops_before_the_model(run):
    out = _train(run, "--validate_only")
    assert out.returncode == 0 and "config OK (1 devices)" in out.stdout, out.stderr[-2000:]
