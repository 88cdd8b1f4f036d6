"""Host-side indices (M-RoPE positions, window layout, token scatter) against transformers' own."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bbu_jax.models.qwen2_5_vl import processing, scatter_vision_tokens

torch = pytest.importorskip("torch")
from transformers import vision_utils  # noqa: E402

IMG, VS, VE = 50, 51, 52  # image pad, vision start, vision end ids of the synthetic sequences

grids_st = st.lists(st.tuples(st.just(1), st.integers(1, 12).map(lambda n: 2 * n),
                              st.integers(1, 12).map(lambda n: 2 * n)), min_size=0, max_size=3)


def sequence(grids, text_lens) -> np.ndarray:
    """text, then per image: vision_start, pads, vision_end, text."""
    rng = np.random.default_rng(len(grids))
    ids = list(rng.integers(0, 40, text_lens[0]))
    for g, n in zip(grids, text_lens[1:]):
        ids += [VS] + [IMG] * processing.num_image_tokens(g) + [VE] + list(rng.integers(0, 40, n))
    return np.asarray(ids, np.int64)


class _RopeConfig:  # the two fields get_rope_index reads
    class vision_config:
        spatial_merge_size = 2
        tokens_per_second = 2


def hf_rope_index(input_ids: np.ndarray, grids, attention_mask=None):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    ids = torch.from_numpy(np.atleast_2d(input_ids))
    stub = type("Stub", (), {"config": _RopeConfig,
                             "get_vision_position_ids": Qwen2_5_VLModel.get_vision_position_ids})()
    pos, delta = Qwen2_5_VLModel.get_rope_index(
        stub, ids, mm_token_type_ids=(ids == IMG).int(),
        image_grid_thw=torch.tensor(grids, dtype=torch.long) if grids else None,
        attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask))
    return pos.numpy(), delta.numpy()


def test_rope_index_reference_example():
    pos, delta = processing.rope_index(np.array([1, 2, 3, 4, VS] + [IMG] * 6 + [VE]), [(1, 4, 6)],
                                 image_token_id=IMG, vision_start_token_id=VS)
    np.testing.assert_array_equal(pos[:, 5:11], [[5] * 6, [5, 5, 5, 6, 6, 6], [5, 6, 7, 5, 6, 7]])
    assert pos[:, 11].tolist() == [8, 8, 8] and delta == 9 - 12


@settings(max_examples=25, deadline=None)
@given(grids=grids_st, text_lens=st.lists(st.integers(1, 6), min_size=4, max_size=4))
def test_rope_index_matches_transformers(grids, text_lens):
    ids = sequence(grids, text_lens)
    pos, delta = processing.rope_index(ids, grids, image_token_id=IMG, vision_start_token_id=VS)
    ref, ref_delta = hf_rope_index(ids, grids)
    np.testing.assert_array_equal(pos, ref[:, 0])
    assert delta == int(ref_delta[0, 0])


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_positions_match_transformers_with_padding(side):
    rows = [sequence([(1, 4, 6)], [3, 2]), sequence([(1, 8, 4), (1, 2, 2)], [5, 1, 4])]
    length = max(len(r) for r in rows)
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for b, r in enumerate(rows):
        sl = slice(length - len(r), None) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    grids = [(1, 4, 6), (1, 8, 4), (1, 2, 2)]
    pixels = np.random.default_rng(0).normal(size=(sum(int(np.prod(g)) for g in grids), 1176))
    out = processing.prepare_hf_batch(ids, mask, pixels, np.array(grids), image_token_id=IMG,
                                vision_start_token_id=VS)
    ref, _ = hf_rope_index(ids, grids, attention_mask=mask)
    np.testing.assert_array_equal(out["positions"], ref.transpose(1, 0, 2))
    np.testing.assert_array_equal(out["segment_ids"], mask)
    assert out["patches"].shape[1] % 4 == 0


@settings(max_examples=25, deadline=None)
@given(grids=grids_st.filter(bool))
def test_vision_layout_matches_transformers(grids):
    g = torch.tensor(grids, dtype=torch.long)
    window_index, cu_windows = vision_utils.get_vision_window_index(g, 2, 112, 14)
    pos = vision_utils.get_vision_position_ids(g, 2).numpy()
    cu_images = vision_utils.get_vision_cu_seqlens(g).numpy()
    lay = processing.vision_layout(grids)
    perm = (window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    np.testing.assert_array_equal(lay.perm, perm)
    np.testing.assert_array_equal(lay.pos, pos[perm])
    np.testing.assert_array_equal(lay.window_ids, np.repeat(np.arange(1, len(cu_windows)), np.diff(cu_windows)))
    np.testing.assert_array_equal(lay.image_ids, np.repeat(np.arange(1, len(cu_images)), np.diff(cu_images)))
    np.testing.assert_array_equal(lay.merged_index, np.argsort(window_index.numpy()))


def test_vision_layout_temporal_frames_are_separate_segments():
    g = torch.tensor([[2, 4, 4]])
    lay = processing.vision_layout([(2, 4, 4)])
    window_index, cu_windows = vision_utils.get_vision_window_index(g, 2, 112, 14)
    np.testing.assert_array_equal(lay.perm, (window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1))
    assert lay.image_ids.tolist() == [1] * 16 + [2] * 16


def test_scatter_places_merged_tokens_in_text_order():
    """Features in window order land on the image pads in processor (text) order."""
    import jax.numpy as jnp

    grids = [(1, 10, 6), (1, 4, 18)]
    ids = sequence(grids, [2, 3, 1])[None]
    n_rows = sum(int(np.prod(g)) for g in grids)
    batch = processing.prepare_hf_batch(ids, None, np.zeros((n_rows, 1176)), np.array(grids), image_token_id=IMG,
                                  vision_start_token_id=VS, patch_budget=n_rows + 8)
    lay = processing.vision_layout(grids)
    feats_text_order = np.random.default_rng(0).normal(size=(n_rows // 4, 5)).astype(np.float32)
    feats_window = np.zeros((1, batch["patches"].shape[1] // 4, 5), np.float32)
    feats_window[0, :n_rows // 4] = feats_text_order[np.argsort(lay.merged_index)]
    embeds = np.random.default_rng(1).normal(size=(1, ids.shape[1], 5)).astype(np.float32)
    out = np.asarray(scatter_vision_tokens(jnp.asarray(embeds), jnp.asarray(feats_window),
                                           jnp.asarray(batch["vision_token_index"])))
    is_img = ids[0] == IMG
    np.testing.assert_array_equal(out[0, is_img], feats_text_order)
    np.testing.assert_array_equal(out[0, ~is_img], embeds[0, ~is_img])


def test_prepare_rejects_inconsistent_inputs():
    ids = sequence([(1, 4, 4)], [2, 2])[None]
    with pytest.raises(ValueError, match="image tokens"):
        processing.prepare_hf_batch(ids, None, np.zeros((64, 1176)), np.array([(1, 4, 8)]), image_token_id=IMG,
                              vision_start_token_id=VS)
    with pytest.raises(ValueError, match="patch_budget"):
        processing.prepare_hf_batch(ids, None, np.zeros((16, 1176)), np.array([(1, 4, 4)]), image_token_id=IMG,
                              vision_start_token_id=VS, patch_budget=8)
    with pytest.raises(ValueError, match="vision_start"):
        processing.rope_index(np.array([1] + [IMG] * 4), [(1, 4, 4)], image_token_id=IMG, vision_start_token_id=VS)
