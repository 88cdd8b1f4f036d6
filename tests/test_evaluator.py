"""Jitted batch evaluation: exact means whatever the batching, COCO metrics on the head's boxes."""
import math

import numpy as np
import pytest
from flax import nnx

from bbu_jax.data import convert, synthetic
from bbu_jax.data.collate import Budgets
from bbu_jax.data.encode import SampleEncoder, build_caption_vocab
from bbu_jax.data.pipeline import make_eval_batches
from bbu_jax.data.schema import load_records
from bbu_jax.evaluation.evaluator import evaluate, json_safe
from bbu_jax.losses import LossSpec, LossWeights, MatchCost
from bbu_jax.models.detection_head import DetectionHead, HeadSpec
from bbu_jax.models.qwen2_5_vl import from_hf

PIX = dict(min_pixels=3136, max_pixels=56 * 56 * 8)
WEIGHTS = LossWeights(lm=1.0, bbox_l1=5.0, bbox_giou=2.0, objectness=2.0, caption=1.0,
                      match=MatchCost(2.0, 5.0, 2.0, 0.25, 2.0))
LOSS = LossSpec(weights=WEIGHTS, aux_loss=True, lm_chunk=256, matcher="scipy")


@pytest.fixture(scope="module")
def setup(tiny_hf_dir, tmp_path_factory):
    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("data")
    synthetic.write_labelme_dataset(str(raw), num_images=10, seed=2)
    convert.convert_dataset(str(raw), "labelme", str(out), val_ratio=0.5, teacher_pool_size=1, seed=0,
                            language="en", progress=False, **PIX)
    tokenizer = SampleEncoder(str(tiny_hf_dir), language="en", **PIX).tokenizer
    vocab = build_caption_vocab([str(out / "train.jsonl"), str(out / "val.jsonl")], tokenizer)
    head = DetectionHead(HeadSpec(width=32, num_queries=12, num_layers=2, num_heads=2, mlp_dim=64,
                                  caption_layers=1, max_caption_len=32), llm_hidden=64, rngs=nnx.Rngs(0))
    return dict(model=from_hf(tiny_hf_dir), head=head, val=str(out / "val.jsonl"), tokenizer=tokenizer,
                vocab=vocab, hf=str(tiny_hf_dir))


def _run(setup, rows: int):
    budgets = Budgets(rows=rows, tokens=1024, patches=768, segments=1, objects=16, caption_tokens=32,
                      vision_memory=64, text_memory=48)
    batches = make_eval_batches(setup["val"], SampleEncoder(setup["hf"], language="en", **PIX), budgets)
    records, _ = load_records(setup["val"])
    return evaluate(setup["model"], setup["head"], batches, records, setup["tokenizer"],
                    caption_vocab=setup["vocab"], loss=LOSS, top_k=10)


def test_means_exact_whatever_the_batching(setup):
    one, preds_one = _run(setup, rows=1)
    three, preds_three = _run(setup, rows=3)  # the last batch has padding rows
    n = len(load_records(setup["val"])[0])
    assert n % 3 and one["val/num_samples"] == three["val/num_samples"] == n
    for key in ("val/lm_loss", "val/student_lm_loss", "val/bbox_l1_loss", "val/bbox_giou_loss",
                "val/objectness_loss", "val/caption_loss"):
        assert math.isfinite(one[key]) and one[key] > 0
        assert one[key] == pytest.approx(three[key], rel=1e-5), key
    assert [p["source"] for p in preds_one] == [p["source"] for p in preds_three]
    for a, b in zip(preds_one, preds_three):
        assert len(a["pred"]) == len(b["pred"]) == 10 and a["gt"] == b["gt"]
        np.testing.assert_allclose([o["score"] for o in a["pred"]], [o["score"] for o in b["pred"]], rtol=1e-4)
    # An untrained head finds next to nothing, but the COCO keys are there and JSON-safe.
    assert 0.0 <= one["val/head/box_AP50"] <= 1.0 and "val/mAP50" not in one
    assert all(v is None or math.isfinite(v) for v in json_safe(one).values())


def test_sharded_model_gives_the_same_report(setup, tiny_hf_dir):
    """Model and head placed FSDP over 8 devices: the same losses and detections as on one device."""
    import jax

    from bbu_jax.foundation import sharding

    mesh = sharding.make_mesh(1, 8, 1)
    head = nnx.clone(setup["head"])
    state = nnx.state(head)
    nnx.update(head, jax.device_put(state, sharding.param_shardings(state, mesh)))
    sharded = dict(setup, model=from_hf(tiny_hf_dir, mesh=mesh), head=head)
    assert len(sharded["model"].embed_table().sharding.device_set) == 8
    one, preds_one = _run(setup, rows=8)
    eight, preds_eight = _run(sharded, rows=8)
    for key in ("val/lm_loss", "val/bbox_l1_loss", "val/objectness_loss", "val/caption_loss"):
        assert eight[key] == pytest.approx(one[key], rel=1e-4), key
    for a, b in zip(preds_one, preds_eight):
        np.testing.assert_allclose([o["score"] for o in a["pred"]], [o["score"] for o in b["pred"]], rtol=1e-3)
