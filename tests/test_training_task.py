"""The real task's pieces that need no model: in-jit counts equal the loss module's host counts."""
import jax
import numpy as np

from bbu_jax.data.collate import Budgets, empty_batch
from bbu_jax.losses import loss_normalizers
from bbu_jax.training import task


def test_count_fn_matches_loss_normalizers():
    b = Budgets(rows=2, tokens=8, patches=4, segments=2, objects=3, caption_tokens=4, vision_memory=2,
                text_memory=2)
    batch = empty_batch(b)
    r = np.random.default_rng(0)
    batch["target_kind"][:] = r.integers(0, 3, batch["target_kind"].shape)
    batch["gt_valid"][:] = r.uniform(size=batch["gt_valid"].shape) < 0.6
    batch["segment_valid"][:] = [[True, False], [True, True]]
    batch["gt_caption_mask"][:] = r.uniform(size=batch["gt_caption_mask"].shape) < 0.5
    got = jax.jit(task.count_fn)(batch)
    want = loss_normalizers(batch)
    assert set(got) == set(want)
    for k in want:
        assert float(got[k]) == want[k], k
    assert want["boxes"] > 0 and want["caption_tokens"] > 0
