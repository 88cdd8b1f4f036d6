"""Exact (sum, count) averaging and the run folder files."""
import json

import numpy as np
import pytest

from bbu_jax.training import metrics_logging as ml


def test_sum_count_average_is_token_weighted():
    acc = ml.SumCountAccumulator()
    acc.add({"lm_loss": (np.float32(10.0), np.float32(2.0)), "skipped_steps": (1.0, 1.0)})
    acc.add({"lm_loss": (np.float32(3.0), np.float32(6.0)), "skipped_steps": (0.0, 1.0)})
    acc.add({"caption_loss": (0.0, 0.0)})  # a term with no units this interval
    out = acc.averages()
    assert out["lm_loss"] == pytest.approx(13.0 / 8.0)  # not the mean of means (5 + 0.5) / 2
    assert out["skipped_steps"] == 1.0  # a total
    assert "caption_loss" not in out
    acc.reset()
    assert acc.averages() == {}


def test_run_logger_writes_jsonl_tensorboard_summary(tmp_path):
    log = ml.RunLogger(tmp_path, is_main=True, total_steps=4)
    log.train.add({"lm_loss": (4.0, 2.0)})
    log.train.add({"lm_loss": (2.0, 2.0)})
    log.progress(2, 1.5, 100.0)
    vals = log.log_train(2, {"lr/llm": 1e-5, "tokens_per_s": 100.0})
    assert vals["train/lm_loss"] == pytest.approx(1.5)
    log.log_eval(2, {"mAP50": 0.25, "lm_loss": float("nan")})
    log.log_images(2, "val/boxes", np.zeros((2, 8, 8, 3), np.uint8))
    log.write_summary({"val/mAP50": 0.25, "last_checkpoint": "x"})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 2, "train/lm_loss": 1.5, "train/lr/llm": 1e-5, "train/tokens_per_s": 100.0}
    assert lines[1]["val/mAP50"] == 0.25 and np.isnan(lines[1]["val/lm_loss"])
    assert json.loads((tmp_path / "summary.json").read_text())["val/mAP50"] == 0.25
    assert log.last == {"train/lm_loss": 1.5, "train/lr/llm": 1e-5, "train/tokens_per_s": 100.0,
                        "val/mAP50": 0.25, "val/lm_loss": log.last["val/lm_loss"]}  # the newest value of each
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_non_main_process_writes_nothing(tmp_path):
    log = ml.RunLogger(tmp_path / "w", is_main=False, total_steps=1)
    log.train.add({"x": (1.0, 1.0)})
    log.log_train(1, {})
    log.write_summary({"a": 1})
    log.close()
    assert not (tmp_path / "w").exists()
