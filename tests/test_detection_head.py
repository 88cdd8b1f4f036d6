"""Detection head: shapes, masking, caption vocabulary, greedy decoding, and that it can overfit."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _detection_testing import C, HEAD_FIELDS, Q, VOCAB, W, loss_and_grads, make_head, random_arrays, random_batch
from flax import nnx

from bbu_jax.losses import box_ops
from bbu_jax.models.detection_head import box_read, caption_vocab_index, check_caption_ids


@pytest.fixture(scope="module")
def setup():
    return (make_head(), random_batch(0)) + random_arrays(0)


@nnx.jit
def _forward(head, hidden, inputs):
    return head(hidden, *inputs)


def test_output_shapes_and_objectness_prior(setup):
    head, batch, hidden, _ = setup
    out = _forward(head, hidden, tuple(batch[k] for k in HEAD_FIELDS))
    assert out["boxes"].shape == (2, 2, 2, Q, 4) and out["logits"].shape == (2, 2, 2, Q)
    assert out["queries"].shape == (2, 2, Q, W)
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert np.all((out["boxes"] > 0) & (out["boxes"] < 1))
    np.testing.assert_allclose(head.objectness.bias[...], -math.log(99.0), rtol=1e-6)


def test_masked_memory_is_ignored(setup):
    """Changing hidden states only reachable through masked memory slots changes nothing."""
    head, batch, hidden, _ = setup
    batch = dict(batch)
    batch["det_vision_mask"] = batch["det_vision_mask"].copy()
    batch["det_vision_mask"][:, :, -3:] = False
    batch["det_text_mask"] = batch["det_text_mask"].copy()
    batch["det_text_mask"][:, 1] = False
    masked_pos = np.unique(np.concatenate([batch["det_vision_index"][:, :, -3:].ravel(),
                                           batch["det_text_index"][:, 1].ravel()]))
    inputs = tuple(batch[k] for k in HEAD_FIELDS)
    changed = hidden.at[:, masked_pos].add(5.0)
    a, b = _forward(head, hidden, inputs), _forward(head, changed, inputs)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    # (logits: an untrained head's boxes are its anchors, refined by a zero-initialized delta)
    assert not np.allclose(_forward(head, hidden.at[:, batch["det_vision_index"][0, 0, 0]].add(5.0), inputs)["logits"],
                           a["logits"])


def test_all_padding_segment_is_finite(setup):
    head, batch, hidden, _ = setup
    batch = dict(batch, det_vision_mask=np.zeros_like(batch["det_vision_mask"]),
                 det_text_mask=np.zeros_like(batch["det_text_mask"]))
    out = _forward(head, hidden, tuple(batch[k] for k in HEAD_FIELDS))
    assert all(np.all(np.isfinite(v)) for v in out.values())


def test_box_read_takes_the_tokens_around_each_box():
    """A box around one token reads it, a box between two reads their mean, a box smaller than a
    token reads the nearest one; padding tokens are never read and an image-less segment reads 0."""
    values = jnp.asarray([[[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]])  # (1, 1, 3, 2): third is padding
    pos = jnp.asarray([[[[0.25, 0.25], [0.25, 0.75], [0.5, 0.5]]]])  # (y, x)
    valid = jnp.asarray([[[True, True, False]]])
    boxes = jnp.asarray([[[[0.25, 0.25, 0.2, 0.2],     # (cx, cy, w, h) around token 0
                           [0.5, 0.25, 0.5, 0.2],      # between tokens 0 and 1
                           [0.7, 0.3, 0.01, 0.01]]]])  # tiny, nearest to token 1
    out = np.asarray(box_read(values, pos, valid, boxes))[0, 0]
    np.testing.assert_allclose(out[0], [1.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(out[1], [0.5, 0.5], atol=1e-4)
    np.testing.assert_allclose(out[2], [0.0, 1.0], atol=1e-4)
    empty = box_read(values, pos, jnp.zeros_like(valid), boxes)
    assert np.all(np.asarray(empty) == 0)


def test_caption_vocab_index_and_host_check():
    ids = jnp.asarray([[7, 63, 5], [3, 64, 0]], jnp.int32)
    idx, ok = caption_vocab_index(ids, jnp.asarray(VOCAB))
    np.testing.assert_array_equal(ok, [[True, True, False], [True, False, False]])
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], [1, 6, 0])
    mask = np.array([[True, True, False], [True, False, False]])
    check_caption_ids(np.asarray(ids), mask, VOCAB)  # out-of-vocab ids only where masked
    with pytest.raises(ValueError, match="not in caption_vocab.*5"):
        check_caption_ids(np.asarray(ids), np.ones_like(mask), VOCAB)
    with pytest.raises(ValueError, match="strictly increasing"):
        check_caption_ids(np.asarray(ids), mask, VOCAB[::-1])


def test_greedy_captions_agree_with_teacher_forcing(setup):
    head, _, _, table = setup
    queries = jnp.asarray(np.random.default_rng(1).normal(size=(4, W)), jnp.float32)
    ids, lengths = nnx.jit(type(head).greedy_captions)(head, queries, table, jnp.asarray(VOCAB),
                                                          jnp.int32(VOCAB[-1]))
    assert ids.shape == (4, C) and lengths.shape == (4,)
    assert np.all(np.isin(np.asarray(ids), VOCAB))
    index, _ = caption_vocab_index(ids, jnp.asarray(VOCAB))
    forced = jnp.argmax(nnx.jit(type(head).caption_logits)(head, queries, index, table, jnp.asarray(VOCAB)), -1)
    for n in range(4):
        upto = min(int(lengths[n]) + 1, C)  # tokens up to and including the end token
        np.testing.assert_array_equal(forced[n, :upto], index[n, :upto])
        assert np.all(np.asarray(ids[n, int(lengths[n]):]) == VOCAB[-1])


def test_bfloat16_compute_close_to_float32(setup):
    _, batch, hidden, _ = setup
    inputs = tuple(batch[k] for k in HEAD_FIELDS)
    f32 = _forward(make_head(3), hidden, inputs)
    bf16 = _forward(make_head(3, dtype=jnp.bfloat16), hidden, inputs)
    err = float(jnp.abs(f32["boxes"] - bf16["boxes"]).max())
    print(f"bf16 vs f32 max box error {err:.2e}")
    assert bf16["boxes"].dtype == jnp.float32 and err < 0.05


def _apply(optimizer, params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def test_head_overfits_fixed_memories():
    """200 Adam steps on the head alone: matched IoU > 0.8, caption accuracy ~1."""
    batch = random_batch(7)
    batch["segment_valid"][1, 1] = False  # one padding segment
    batch["det_vision_mask"][1, 1] = False
    batch["det_text_mask"][1, 1] = False
    hidden, table = random_arrays(7)
    graphdef, params = nnx.split(make_head(1))
    steps = 200
    adam = optax.adam(optax.cosine_decay_schedule(5e-3, steps))
    update = jax.jit(lambda params, opt_state, grads: _apply(adam, params, opt_state, grads))
    opt_state = adam.init(params)
    for _ in range(steps):  # loss_and_grads is the multitask tests' compiled step
        loss, metrics, (grads, _, _) = loss_and_grads((graphdef, params), hidden, table, batch)
        params, opt_state = update(params, opt_state, grads)
    iou = float(metrics["matched_iou"][0] / metrics["matched_iou"][1])
    acc = float(metrics["caption_token_accuracy"][0] / metrics["caption_token_accuracy"][1])
    print(f"loss {float(loss):.3f} matched IoU {iou:.3f} caption accuracy {acc:.3f}")
    assert iou > 0.8 and acc > 0.98

    # Every valid GT box has a close prediction in the head's own forward pass.
    out = _forward(nnx.merge(graphdef, params), hidden, tuple(batch[k] for k in HEAD_FIELDS))
    pred = box_ops.box_cxcywh_to_xyxy(out["boxes"][-1]).reshape(-1, Q, 4)
    gt = box_ops.box_cxcywh_to_xyxy(jnp.asarray(batch["gt_boxes"])).reshape(pred.shape[0], -1, 4)
    best = np.asarray(jax.vmap(box_ops.box_iou)(gt, pred).max(-1)).reshape(batch["gt_valid"].shape)
    assert best[batch["gt_valid"] & batch["segment_valid"][..., None]].min() > 0.5
