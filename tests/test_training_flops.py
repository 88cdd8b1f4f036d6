"""The one model-FLOPs count (bbu_jax.training.flops), behind the training log's MFU and every benchmark:
pinned by hand on small cases, read back from batches, and the attention work each kernel does."""
import numpy as np
import pytest

from bbu_jax.models.qwen2_5_vl import processing
from bbu_jax.training.flops import attention_pairs, batch_flops, batch_layout, step_flops, supervised_tokens
from bbu_jax.perf.synthetic import packed_batch, tiny_config


def test_step_flops_by_hand():
    cfg = tiny_config()
    t = cfg.text
    # one row: one 10-token segment, 4 of them supervised, one 8x8-patch image (exactly one 64-patch window)
    got = step_flops(cfg, segments=[[10]], images=[[(1, 8, 8)]], supervised=[4])
    text = t.num_hidden_layers * (64 * (64 + 32 + 32 + 64) + 3 * 64 * 128)  # q, k, v, o; mlp
    fwd = 2 * 10 * text + 2 * 4 * 640 * 64 + 4 * t.num_hidden_layers * 4 * 16 * 55  # LM head: supervised only
    vis = 1176 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64)
    fwd += 2 * 64 * vis + 2 * 16 * (128 * 128 + 128 * 64) + 4 * 32 * 2 * 64 * 64
    assert got == pytest.approx(3 * fwd)
    # each supervised token adds the LM head's product (vocab x hidden), forward and backward
    more = step_flops(cfg, segments=[[10]], images=[[(1, 8, 8)]], supervised=[9])
    assert more - got == pytest.approx(3 * 2 * 5 * 640 * 64)
    # the detection head's parameters are charged once per token, forward and backward
    with_head = step_flops(cfg, segments=[[10]], images=[[(1, 8, 8)]], supervised=[4], head_params=1000)
    assert with_head - got == pytest.approx(3 * 2 * 10 * 1000)


def test_batch_layout_reads_segments_and_grids():
    """Segment lengths and image grids read back from a batch equal the ones it was built from
    (packed rows; a row of non-square images)."""
    cfg = tiny_config()
    batch, seg_lens, grids = packed_batch(cfg, rows=2, tokens=256, segments=2, image_side=112)
    assert batch_layout(batch) == (seg_lens, grids)
    shapes = [(1, 4, 6), (1, 8, 8), (1, 2, 2)]
    lay = processing.vision_layout(shapes, window_size=112, patch_size=14, spatial_merge_size=2)
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    got = batch_layout({"segment_ids": seg, "patch_image_ids": lay.image_ids[None], "patch_pos": lay.pos[None]})
    assert got == ([[3, 2]], [shapes])
    with pytest.raises(ValueError, match="do not fill"):
        batch_layout({"segment_ids": seg, "patch_image_ids": lay.image_ids[None, :-1],
                      "patch_pos": lay.pos[None, :-1]})


def test_batch_flops_of_a_training_step_batch():
    """What the training loop hands the count: a step's micro-batches stacked on a leading axis.
    Every row counts, as step_flops of the layout the batch was built from."""
    cfg = tiny_config()
    batch, seg_lens, grids = packed_batch(cfg, rows=2, tokens=256, segments=2, image_side=112)
    step = {k: np.stack([v, v]) for k, v in batch.items()}  # 2 micro-batches of 2 rows
    supervised = [int((row > 0).sum()) for row in batch["target_kind"]]
    assert supervised_tokens(step) == supervised * 2 and 0 < supervised[0] < 256
    expected = step_flops(cfg, segments=seg_lens * 2, images=grids * 2, supervised=supervised * 2, head_params=7)
    assert batch_flops(cfg, step, head_params=7) == pytest.approx(expected)
    assert batch_flops(cfg, batch) == pytest.approx(step_flops(cfg, segments=seg_lens, images=grids,
                                                               supervised=supervised))


def test_attention_pairs_by_hand():
    """A 512-token row of two causal 256-token samples: cudnn multiplies all 512^2 pairs; the
    pallas kernel's 128-query blocks visit 2, 4, 2, 4 key blocks of 64 (12 of 32); not causal, its
    64-query blocks visit exactly their sample's 4 key blocks."""
    seg = np.repeat([[1, 2]], 256, axis=1).astype(np.int32)
    batch = {"segment_ids": seg, "patch_window_ids": seg, "patch_image_ids": seg}
    needed = 2 * 256 * 257 // 2
    assert attention_pairs(batch, "cudnn")["text"] == (512**2, needed)
    assert attention_pairs(batch, "pallas")["text"] == (12 * 128 * 64, needed)
    assert attention_pairs(batch, "pallas")["vision full"] == (2 * 256**2, 2 * 256**2)


def test_executed_flops_counts_loops_and_the_largest_branch():
    """Every product of a compiled module: a scan's body times its trips (XLA's cost analysis
    counts it once), a batched dot, and a conditional's largest branch."""
    import jax
    import jax.numpy as jnp

    from bbu_jax.perf.hlo_flops import executed_flops

    def f(x, w, p):
        y = jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]  # 10 x (64x128 @ 128x128)
        y = jax.lax.cond(p, lambda: y @ w[0], lambda: y)  # the larger branch: one more product
        return jnp.einsum("bij,bjk->bik", jnp.stack([y, y, y]), w[:3])  # batched: 3 more

    x, w = jnp.ones((64, 128)), jnp.ones((10, 128, 128))
    compiled = jax.jit(f).lower(x, w, True).compile()
    flops, hidden = executed_flops(compiled.as_text())
    assert flops == 14 * 2 * 64 * 128 * 128 and hidden == {}
    assert compiled.cost_analysis()["flops"] < flops / 2  # why this count exists


def test_executed_flops_counts_a_data_dependent_loop_once_and_lists_it():
    """A loop that runs until its data says so (the on-device matcher's) has no trip count to read:
    its body counts once and the loop is listed with the uncounted work."""
    import jax
    import jax.numpy as jnp

    from bbu_jax.perf.hlo_flops import UNKNOWN_TRIPS, executed_flops

    def f(x, w):
        return jax.lax.while_loop(lambda c: c.sum() < 1e6, lambda c: jnp.abs(c @ w) + 1.0, x)

    compiled = jax.jit(f).lower(jnp.ones((32, 64)), jnp.ones((64, 64))).compile()
    flops, hidden = executed_flops(compiled.as_text())
    assert flops == 2 * 32 * 64 * 64 and hidden == {UNKNOWN_TRIPS: 1}
