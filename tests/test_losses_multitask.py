"""Multi-task loss: degenerate inputs stay finite, sums/counts recombine exactly, gradient
accumulation with global normalizers equals the full batch, sharded jit equals unsharded."""
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _detection_testing import DETR_LOSS, DETR_WEIGHTS, VOCAB, loss_and_grads, make_head, random_arrays, random_batch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bbu_jax.losses import loss_normalizers, metric_means

LM_NAMES = {"lm_loss", "teacher_lm_loss", "student_lm_loss"}


@pytest.fixture(scope="module")
def head():
    return make_head()


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_degenerate_segments_and_boxes_are_finite(head):
    hidden, table = random_arrays(0)
    batch = random_batch(0)
    batch["gt_valid"][0, 0] = False  # a real segment with no objects
    batch["segment_valid"][1, 1] = False  # an all-padding segment
    batch["gt_valid"][1, 1] = False
    batch["det_vision_mask"][1, 1] = False
    batch["det_text_mask"][1, 1] = False
    batch["gt_caption_mask"][1, 1] = False
    batch["gt_boxes"][0, 1, :, 2] = 0.0  # zero-width GT boxes
    batch["gt_boxes"][1, 0, 0, 2:] = 0.0  # a zero-area GT box
    total, metrics, grads = loss_and_grads(head, hidden, table, batch)
    assert np.isfinite(total) and _all_finite(metrics) and _all_finite(grads)
    assert float(metrics["bbox_l1_loss"][1]) == float((batch["gt_valid"] & batch["segment_valid"][..., None]).sum())

    empty = dict(batch, gt_valid=np.zeros_like(batch["gt_valid"]),
                 gt_caption_mask=np.zeros_like(batch["gt_caption_mask"]))
    total, metrics, grads = loss_and_grads(head, hidden, table, empty)
    assert np.isfinite(total) and _all_finite(grads)
    assert float(metrics["bbox_l1_loss"][0]) == 0.0 and float(metrics["objectness_loss"][0]) > 0.0


def test_aux_loss_off_trains_the_final_layer_only(head):
    """LossSpec.aux_loss=False: no *_aux terms, the total is the final layer's, and the earlier
    decoder layers' box/objectness outputs get no gradient of their own."""
    hidden, table = random_arrays(1)
    batch = random_batch(1)
    spec = dataclasses.replace(DETR_LOSS, aux_loss=False)
    total, metrics, _ = loss_and_grads(head, hidden, table, batch, spec=spec)
    assert not [k for k in metrics if k.endswith("_aux")]
    means = metric_means(metrics)
    w = DETR_WEIGHTS
    expected = (w.lm * means["lm_loss"] + w.caption * means["caption_loss"]
                + sum(getattr(w, k) * means[f"{k}_loss"] for k in ("bbox_l1", "bbox_giou", "objectness")))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    with_aux, aux_metrics, _ = loss_and_grads(head, hidden, table, batch)
    for k in ("bbox_l1_loss", "objectness_loss", "caption_loss"):  # the final layer's terms agree
        np.testing.assert_allclose(metrics[k][0], aux_metrics[k][0], rtol=1e-6)
    assert float(with_aux) > float(total)


def test_total_recombines_from_sums_and_counts(head):
    hidden, table = random_arrays(1)
    batch = random_batch(1)
    total, metrics, _ = loss_and_grads(head, hidden, table, batch)
    means = metric_means(metrics)
    w = DETR_WEIGHTS
    expected = (w.lm * means["lm_loss"] + w.caption * means["caption_loss"]
                + sum(getattr(w, k) * (means[f"{k}_loss"] + means[f"{k}_loss_aux"])
                      for k in ("bbox_l1", "bbox_giou", "objectness")))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    counts = loss_normalizers(batch)
    assert float(metrics["lm_loss"][1]) == counts["tokens"]
    assert float(metrics["bbox_giou_loss"][1]) == counts["boxes"]
    assert float(metrics["caption_loss"][1]) == counts["caption_tokens"]
    np.testing.assert_allclose(metrics["teacher_lm_loss"][0] + metrics["student_lm_loss"][0],
                               metrics["lm_loss"][0], rtol=1e-6)


def test_gradient_accumulation_with_global_normalizers_is_exact(head):
    hidden, table = random_arrays(2)
    batch = random_batch(2)
    full_total, full_metrics, full_grads = loss_and_grads(head, hidden, table, batch)
    halves = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]
    glob = {k: jnp.float32(v) for k, v in loss_normalizers(batch).items()}
    parts = [loss_and_grads(head, hidden[i:i + 1], table, halves[i], glob) for i in range(2)]
    np.testing.assert_allclose(parts[0][0] + parts[1][0], full_total, rtol=1e-5)
    summed = jax.tree.map(lambda a, b: a + b, parts[0][2], parts[1][2])
    for name, g, r in (("head", summed[0], full_grads[0]), ("embed_table", summed[2], full_grads[2])):
        g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
        r = np.concatenate([np.ravel(x) for x in jax.tree.leaves(r)])
        rel = np.linalg.norm(g - r) / np.linalg.norm(r)
        print(f"{name} accumulated grad rel err {rel:.2e}")
        assert rel < 1e-5
    for name, (s, c) in full_metrics.items():  # exact means from summed (sum, count)
        np.testing.assert_allclose(parts[0][1][name][0] + parts[1][1][name][0], s, rtol=1e-5, atol=1e-5)
        if name != "caption_oov_tokens":
            assert float(parts[0][1][name][1] + parts[1][1][name][1]) == float(c)


def test_gradients_reach_hidden_and_embedding_table(head):
    """With no LM supervision the tied table gets gradient only from the caption loss, at the
    caption vocabulary rows; hidden gets gradient exactly at the head's memory positions."""
    hidden, table = random_arrays(3)
    batch = random_batch(3)
    batch["target_kind"][:] = 0
    _, _, (_, g_hidden, g_table) = loss_and_grads(head, hidden, table, batch)
    rows = np.abs(np.asarray(g_table)).sum(-1) > 0
    np.testing.assert_array_equal(np.flatnonzero(rows), VOCAB)
    used = np.zeros(hidden.shape[:2], bool)
    for k in ("det_vision_index", "det_text_index"):
        for b in range(used.shape[0]):
            used[b, batch[k][b].ravel()] = True
    g = np.abs(np.asarray(g_hidden)).sum(-1)
    assert np.all(g[used] > 0) and np.all(g[~used] == 0)


def test_language_only(head):
    hidden, table = random_arrays(4)
    batch = random_batch(4)
    total, metrics, grads = loss_and_grads(head, hidden, table, batch, detection=False)
    assert set(metrics) == LM_NAMES
    np.testing.assert_allclose(total, metrics["lm_loss"][0] / metrics["lm_loss"][1], rtol=1e-6)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(grads[0]))


def test_sharded_jit_matches_single_device(head):
    """Default counts (summed inside jit over a batch sharded on 2 devices) are global; the host
    matcher callback works under sharding."""
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (conftest sets 8 fake CPU devices)")
    hidden, table = random_arrays(5)
    batch = random_batch(5)
    ref_total, ref_metrics, _ = loss_and_grads(head, hidden, table, batch)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", *([None] * (x.ndim - 1)))))
    total, metrics, _ = loss_and_grads(head, shard(hidden), table, jax.tree.map(shard, batch), None)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name][1], ref_metrics[name][1])


def test_loss_normalizers_count_on_host_and_under_jit():
    from bbu_jax.data.collate import Budgets, empty_batch

    b = Budgets(rows=2, tokens=8, patches=4, segments=2, objects=3, caption_tokens=4, vision_memory=2,
                text_memory=2)
    batch = empty_batch(b)
    r = np.random.default_rng(0)
    batch["target_kind"][:] = r.integers(0, 3, batch["target_kind"].shape)
    batch["gt_valid"][:] = r.uniform(size=batch["gt_valid"].shape) < 0.6
    batch["segment_valid"][:] = [[True, False], [True, True]]
    batch["gt_caption_mask"][:] = r.uniform(size=batch["gt_caption_mask"].shape) < 0.5
    valid = batch["gt_valid"] & batch["segment_valid"][..., None]  # a padding segment's boxes never count
    want = {"tokens": (batch["target_kind"] > 0).sum(), "boxes": valid.sum(),
            "caption_tokens": (batch["gt_caption_mask"] & valid[..., None]).sum()}
    assert want["boxes"] < batch["gt_valid"].sum() and want["caption_tokens"] > 0
    for got in (loss_normalizers(batch), jax.jit(loss_normalizers)(batch)):
        assert {k: float(v) for k, v in got.items()} == {k: float(v) for k, v in want.items()}
