"""Detection metrics on hand-made cases whose values follow from the definitions."""
import math

import numpy as np
import pytest

from bbu_jax.evaluation.metrics import (box_iou, caption_scores, desc_type, generate_metrics,
                                        greedy_match, head_metrics)
from bbu_jax.inference.parser import parse_response

SCREW = "螺丝连接点/BBU安装螺丝/连接正确"
SCREW_BAD = "螺丝连接点/BBU安装螺丝/连接错误"
LABEL = "标签/光纤标签/清晰"
CABLE = "cable/fiber/ok"


def obj(box, desc, score=None):
    o = {"bbox_2d": list(box), "desc": desc}
    if score is not None:
        o["score"] = score
    return o


GT = [
    [obj((10, 10, 60, 60), SCREW), obj((100, 100, 200, 150), LABEL)],
    [obj((0, 0, 40, 80), CABLE)],
]


def as_head(objs, scores):
    return {"boxes": np.array([o["bbox_2d"] for o in objs], float).reshape(-1, 4),
            "scores": np.array(scores, float), "captions": [o["desc"] for o in objs]}


def test_desc_type_normalizes_full_width():
    assert desc_type(" 螺丝连接点 ／BBU安装螺丝/连接正确") == "螺丝连接点"


def test_box_iou_matches_definition():
    iou = box_iou([[0, 0, 10, 10], [5, 0, 15, 10]], [[0, 0, 10, 10], [0, 0, 20, 10]])
    np.testing.assert_allclose(iou, [[1.0, 0.5], [1 / 3, 0.5]])
    assert box_iou(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


def test_greedy_match_by_iou_is_one_to_one():
    iou = np.array([[0.9, 0.6], [0.8, 0.55], [0.3, 0.2]])
    assert sorted(greedy_match(iou)) == [(0, 0), (1, 1)]
    # By score order: pred 1 comes first and takes GT 0, its best.
    assert greedy_match(iou, pred_order=[1, 0, 2]) == [(1, 0), (0, 1)]
    assert greedy_match(iou, allowed=np.array([[0, 1], [1, 0], [1, 1]], bool)) == [(1, 0), (0, 1)]


def test_head_perfect_predictions_give_one():
    pred = [as_head(g, np.linspace(0.9, 0.5, len(g))) for g in GT]
    m = head_metrics(GT, pred)
    for key in ("head/box_AP", "head/box_AP50", "head/box_AR100", "head/type_mAP", "head/type_mAP50",
                "head/caption_accuracy"):
        assert m[key] == pytest.approx(1.0), key
    for t in ("螺丝连接点", "标签", "cable"):
        assert m[f"head/AP/{t}"] == pytest.approx(1.0)
    assert (m["head/num_gt"], m["head/num_pred"]) == (3, 3)


def test_head_shifted_box_counts_only_at_low_iou():
    """One GT and a box with IoU 0.58: a hit at thresholds .50 and .55, a miss at the other 8."""
    gt = [[obj((0, 0, 100, 100), SCREW)]]
    shifted = [0, 0, 100, 58]  # IoU = 0.58
    assert box_iou([shifted], [[0, 0, 100, 100]])[0, 0] == pytest.approx(0.58)
    m = head_metrics(gt, [[obj(shifted, SCREW, 0.9)]])
    assert m["head/box_AP50"] == pytest.approx(1.0)
    assert m["head/box_AP"] == pytest.approx(0.2)
    assert m["head/box_AR100"] == pytest.approx(0.2)


def test_head_false_positive_ranked_first_halves_precision():
    """A confident box on an image with no GT outranks the only true positive."""
    gt = [[obj((0, 0, 50, 50), CABLE)], []]
    pred = [[obj((0, 0, 50, 50), CABLE, 0.5)], [obj((5, 5, 30, 30), CABLE, 0.9)]]
    m = head_metrics(gt, pred)
    assert m["head/box_AP50"] == pytest.approx(0.5)  # precision 1/2 at recall 1
    assert m["head/box_AR100"] == pytest.approx(1.0)
    # Ranked below the true positive, the same false positive costs nothing.
    pred[1][0]["score"] = 0.1
    assert head_metrics(gt, pred)["head/box_AP50"] == pytest.approx(1.0)


def test_head_per_type_and_wrong_caption():
    """Right boxes, one wrong type: class-agnostic AP stays 1, that type's AP drops to 0."""
    pred = [[obj((10, 10, 60, 60), SCREW, 0.9), obj((100, 100, 200, 150), CABLE, 0.8)],
            [obj((0, 0, 40, 80), CABLE, 0.7)]]
    m = head_metrics(GT, pred)
    assert m["head/box_AP"] == pytest.approx(1.0)
    assert m["head/AP/螺丝连接点"] == pytest.approx(1.0)
    assert m["head/AP/标签"] == pytest.approx(0.0)
    assert m["head/AR100/标签"] == pytest.approx(0.0)
    # cable: the false cable box (0.8) outranks the true one (0.7): precision 1/2 at recall 1.
    assert m["head/AP50/cable"] == pytest.approx(0.5)
    assert m["head/type_mAP50"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert m["head/caption_accuracy"] == pytest.approx(2 / 3)
    assert m["head/caption_accuracy/level1"] == pytest.approx(2 / 3)


def test_head_keeps_top_100_per_image():
    gt = [[obj((0, 0, 10, 10), CABLE)]]
    junk = [obj((500, 500, 510, 510), CABLE, 0.9) for _ in range(100)]
    hit = obj((0, 0, 10, 10), CABLE, 0.5)
    assert head_metrics(gt, [junk + [hit]])["head/box_AR100"] == pytest.approx(0.0)
    assert head_metrics(gt, [junk[:99] + [hit]])["head/box_AR100"] == pytest.approx(1.0)


def test_head_empty_predictions_and_empty_gt():
    empty = [as_head([], []) for _ in GT]
    m = head_metrics(GT, empty)
    assert m["head/box_AP"] == 0.0 and m["head/box_AR100"] == 0.0
    assert math.isnan(m["head/caption_accuracy"])
    m = head_metrics([[], []], [[obj((0, 0, 5, 5), CABLE, 0.9)], []])
    assert math.isnan(m["head/box_AP"])  # nothing to find: undefined, not 0 or 1
    with pytest.raises(ValueError, match="score"):
        head_metrics(GT, [[obj((0, 0, 1, 1), CABLE)], []])
    with pytest.raises(ValueError, match="ground-truth images"):
        head_metrics(GT, [[]])


def test_generate_precision_recall_f1():
    pred = [
        [obj((10, 10, 60, 60), SCREW),          # TP
         obj((100, 100, 200, 150), SCREW_BAD),  # box right, desc wrong: FP and a miss
         obj((300, 300, 320, 320), LABEL)],     # nowhere near a GT: FP
        [obj((0, 0, 40, 80), CABLE), obj((1, 1, 40, 80), CABLE)],  # TP + duplicate FP
    ]
    m = generate_metrics(GT, pred)
    assert m["generate/precision"] == pytest.approx(2 / 5)
    assert m["generate/recall"] == pytest.approx(2 / 3)
    assert m["generate/f1"] == pytest.approx(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3))
    assert m["generate/recall/标签"] == 0.0 and m["generate/recall/cable"] == 1.0
    assert m["generate/precision/螺丝连接点"] == pytest.approx(1 / 2)
    assert m["generate/box_recall"] == pytest.approx(1.0)
    # Captions on the three box matches: SCREW ok, LABEL vs SCREW_BAD wrong, CABLE ok.
    assert m["generate/caption_accuracy"] == pytest.approx(2 / 3)
    assert m["generate/caption_accuracy/level1"] == pytest.approx(2 / 3)
    assert m["generate/caption_matched"] == 3


def test_generate_desc_match_ignores_width_and_spaces():
    pred = [[obj((10, 10, 60, 60), "螺丝连接点 ／ BBU安装螺丝／连接正确"), obj((100, 100, 200, 150), LABEL)],
            [obj((0, 0, 40, 80), CABLE)]]
    assert generate_metrics(GT, pred)["generate/f1"] == pytest.approx(1.0)


def test_generate_counts_parse_outcomes():
    answers = ['```json\n[{"bbox_2d": [10, 10, 60, 60], "desc": "%s"}, {"bbox_2d": [1, 1, 1, 1], '
               '"desc": "x"}]\n```' % SCREW,
               "I cannot see any equipment."]
    parsed = [parse_response(a) for a in answers]
    m = generate_metrics(GT, [p for p, _ in parsed], [s for _, s in parsed])
    assert m["generate/parse_failures"] == 1 and m["generate/complete_json"] == 0.5
    assert m["generate/dropped_objects"] == 1
    assert m["generate/precision"] == 1.0 and m["generate/recall"] == pytest.approx(1 / 3)
    parsed = [parse_response(a) for a in ("```json\n[]\n```", "")]
    m = generate_metrics(GT, [p for p, _ in parsed], [s for _, s in parsed])
    assert (m["generate/empty_outputs"], m["generate/parse_failures"]) == (2, 0)
    assert m["generate/precision"] == 0.0 and m["generate/recall"] == 0.0


def test_generate_images_without_gt():
    m = generate_metrics([[], []], [[], []])
    assert (m["generate/precision"], m["generate/recall"], m["generate/f1"]) == (1.0, 1.0, 1.0)
    m = generate_metrics([[]], [[obj((0, 0, 5, 5), CABLE)]])
    assert (m["generate/precision"], m["generate/recall"], m["generate/f1"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m["generate/caption_accuracy"])


def test_caption_levels_count_only_existing_levels():
    s = caption_scores([("a/b/c", "a/b/c"), ("a/x", "a/b/c"), ("a", "a")])
    assert s["caption_accuracy"] == pytest.approx(2 / 3)
    assert s["caption_accuracy/level1"] == 1.0
    assert s["caption_accuracy/level2"] == pytest.approx(1 / 2)  # GT "a" has no level 2
    assert s["caption_accuracy/level3"] == pytest.approx(1 / 2)  # pred "a/x" lacks level 3


def test_type_keys_are_tensorboard_tags():
    """A desc type with a space would be renamed by TensorBoard; the keys use its form already."""
    from tensorboardX.summary import _clean_tag

    gt = [[obj((0, 0, 40, 40), "BBU device/main unit/installed"), obj((50, 50, 90, 90), "fiber (optical)/cable")]]
    m = head_metrics(gt, [as_head(gt[0], [0.9, 0.8])])
    g = generate_metrics(gt, gt)
    per_type = [k for k in (*m, *g) if k.count("/") >= 2]
    assert "head/AP50/BBU_device" in m and "generate/f1/fiber__optical_" in g
    assert per_type and all(_clean_tag(k) == k for k in per_type)
