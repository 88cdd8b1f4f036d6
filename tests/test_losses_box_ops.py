"""Box conversions, IoU and GIoU against a plain numpy reference, degenerate boxes included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bbu_jax.losses import box_ops


def _np_iou_giou(a, b):
    """Loop reference; 0/0 (empty union or enclosing box) is defined as 0."""
    iou = np.zeros((len(a), len(b)))
    giou = np.zeros((len(a), len(b)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(a):
        for j, (bx1, by1, bx2, by2) in enumerate(b):
            area_a = max(ax2 - ax1, 0) * max(ay2 - ay1, 0)
            area_b = max(bx2 - bx1, 0) * max(by2 - by1, 0)
            inter = max(min(ax2, bx2) - max(ax1, bx1), 0) * max(min(ay2, by2) - max(ay1, by1), 0)
            union = area_a + area_b - inter
            enc = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
            iou[i, j] = inter / union if union > 0 else 0.0
            giou[i, j] = iou[i, j] - ((enc - union) / enc if enc > 0 else 0.0)
    return iou, giou


def _random_xyxy(rng, n, degenerate=False):
    cxcy = rng.random((n, 2))
    wh = 0.01 + rng.random((n, 2)) * 0.5
    if degenerate:  # zero width, zero height, and points
        wh[0::3, 0] = 0.0
        wh[1::3, 1] = 0.0
        wh[2::6] = 0.0
    return np.asarray(box_ops.box_cxcywh_to_xyxy(jnp.asarray(np.concatenate([cxcy, wh], 1), jnp.float32)))


def test_conversions_round_trip():
    boxes = np.random.default_rng(0).random((2, 5, 4)).astype(np.float32)
    back = box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(boxes))
    np.testing.assert_allclose(back, boxes, atol=1e-6)


def test_random_against_numpy():
    rng = np.random.default_rng(1)
    a, b = _random_xyxy(rng, 23), _random_xyxy(rng, 17)
    iou_ref, giou_ref = _np_iou_giou(a.astype(np.float64), b.astype(np.float64))
    iou, giou = np.asarray(box_ops.box_iou(a, b)), np.asarray(box_ops.generalized_box_iou(a, b))
    err_iou = np.abs(iou - iou_ref).max()
    err_giou = np.abs(giou - giou_ref).max()
    print(f"max abs error iou {err_iou:.2e} giou {err_giou:.2e}")
    assert err_iou < 1e-5 and err_giou < 1e-5
    assert giou.shape == (23, 17) and np.all(giou <= 1 + 1e-6) and np.all(giou >= -1 - 1e-6)


def test_random_degenerate_against_numpy():
    """Zero-area boxes: the eps shifts GIoU by at most ~eps / enclosing area; never NaN."""
    rng = np.random.default_rng(2)
    a, b = _random_xyxy(rng, 30, degenerate=True), _random_xyxy(rng, 30, degenerate=True)
    iou_ref, giou_ref = _np_iou_giou(a.astype(np.float64), b.astype(np.float64))
    iou, giou = np.asarray(box_ops.box_iou(a, b)), np.asarray(box_ops.generalized_box_iou(a, b))
    enc = (np.maximum(a[:, None, 2:], b[None, :, 2:]) - np.minimum(a[:, None, :2], b[None, :, :2])).prod(-1)
    bound = 1e-5 + 2 * box_ops.EPS / np.maximum(enc, box_ops.EPS)
    print(f"max abs error iou {np.abs(iou - iou_ref).max():.2e} giou {np.abs(giou - giou_ref).max():.2e}")
    assert np.all(np.isfinite(giou)) and np.all(np.abs(iou - iou_ref) < 1e-5)
    assert np.all(np.abs(giou - giou_ref) <= bound)


@pytest.mark.parametrize("a, b, iou, giou", [
    ([0, 0, 1, 1], [0, 0, 1, 1], 1.0, 1.0),  # identical
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),  # disjoint: enclosing 3, union 2
    ([0, 0, 2, 2], [0.5, 0.5, 1.5, 1.5], 0.25, 0.25),  # nested
    ([0, 0, 0, 1], [0, 0, 1, 1], 0.0, 0.0),  # zero width against a box
    ([0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3], 0.0, 0.0),  # identical points
    ([0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5], 0.0, -1.0),  # distinct points: union 0, enclosing > 0
])
def test_hand_made_cases(a, b, iou, giou):
    a, b = jnp.asarray([a], jnp.float32), jnp.asarray([b], jnp.float32)
    ref_iou, ref_giou = _np_iou_giou(np.asarray(a, np.float64), np.asarray(b, np.float64))
    np.testing.assert_allclose([ref_iou[0, 0], ref_giou[0, 0]], [iou, giou], atol=1e-7)
    np.testing.assert_allclose(box_ops.box_iou(a, b)[0, 0], iou, atol=1e-5)
    np.testing.assert_allclose(box_ops.generalized_box_iou(a, b)[0, 0], giou, atol=1e-5)


def test_gradients_finite_on_degenerate_boxes():
    boxes = jnp.asarray([[0.5, 0.5, 0.0, 0.2], [0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.1, 0.1]], jnp.float32)

    def loss(p):
        x = box_ops.box_cxcywh_to_xyxy(p)
        return (1 - box_ops.generalized_box_iou(x, x)).sum() + box_ops.box_iou(x, x[::-1]).sum()

    value, grad = jax.value_and_grad(loss)(boxes)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
