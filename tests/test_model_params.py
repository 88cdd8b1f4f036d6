"""HF <-> NNX weight mapping: round trips, both key layouts, untied heads, clear errors."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig, from_hf, hf_forward, to_hf_state_dict
from bbu_jax.models.qwen2_5_vl.params import hf_key, weight_files

TEXT = {"input_ids": np.array([[612, 84, 82, 276, 198, 385, 391, 613]])}


def hf_tensors(hf_dir):
    out = {}
    for f in sorted(set(weight_files(hf_dir).values())):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return from_hf(tiny_hf_dir)


def test_roundtrip_legacy_layout_identical(tiny_hf_dir, model):
    ref = hf_tensors(tiny_hf_dir)
    out = to_hf_state_dict(model)
    assert set(out) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)


def test_untied_lm_head(tiny_hf_dir_untied):
    m = from_hf(tiny_hf_dir_untied)
    ref = hf_tensors(tiny_hf_dir_untied)
    assert m.lm_head is not None
    np.testing.assert_array_equal(np.asarray(m.lm_head_matrix()), ref["lm_head.weight"])
    assert "lm_head.weight" in to_hf_state_dict(m)


def test_v5_layout_export_loads_in_transformers(tiny_hf_dir, model, tmp_path):
    """config.to_hf_dict + v5 keys: transformers loads with no missing/unexpected keys, same logits,
    and from_hf reads the v5 layout back."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "v5"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
    state = to_hf_state_dict(model, layout="v5")
    assert all(k.startswith(("model.language_model.", "model.visual.")) for k in state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tm, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        ref = tm.eval()(input_ids=torch.from_numpy(TEXT["input_ids"])).logits.numpy()
    back = from_hf(out)
    assert back.config == model.config
    for logits in (hf_forward(model, **TEXT), hf_forward(back, **TEXT)):
        assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()


def test_sharded_index_and_bf16_weights(tmp_path, model):
    from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl

    d = write_tiny_qwen2_5_vl(tmp_path / "bf16", seed=0, weights_dtype=jnp.bfloat16, max_shard_bytes=20_000)
    assert (d / "model.safetensors.index.json").is_file()
    m = from_hf(d, dtype=jnp.bfloat16)
    assert m.language_model.embed_tokens.weight.get_value().dtype == jnp.bfloat16
    ref = np.asarray(model.embed_table(), np.float32)
    np.testing.assert_allclose(np.asarray(m.embed_table(), np.float32), ref, rtol=1e-2, atol=1e-3)


def corrupt(tiny_hf_dir, tmp_path, edit):
    d = tmp_path / "bad"
    shutil.copytree(tiny_hf_dir, d)
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))
    return d


def test_errors_name_the_key_or_file(tiny_hf_dir, tmp_path):
    k = "model.layers.1.self_attn.q_proj.weight"

    def wrong_shape(t):
        t[k] = t[k][:, :-1].copy()
    with pytest.raises(ValueError, match=r"q_proj\.weight.*shape"):
        from_hf(corrupt(tiny_hf_dir, tmp_path / "a", wrong_shape))
    with pytest.raises(KeyError, match="missing tensor.*q_proj"):
        from_hf(corrupt(tiny_hf_dir, tmp_path / "b", lambda t: t.pop(k)))
    with pytest.raises(KeyError, match="unexpected tensors.*extra"):
        from_hf(corrupt(tiny_hf_dir, tmp_path / "c", lambda t: t.update(extra=np.zeros(2, np.float32))))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        d = tmp_path / "d"
        d.mkdir()
        shutil.copy(tiny_hf_dir / "config.json", d)
        from_hf(d)
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type 'llama'"):
        Qwen25VLConfig.from_hf_dict({**cfg, "model_type": "llama"})


def test_hf_key_layouts():
    path = ("language_model", "layers", "self_attn", "q_proj", "weight")
    assert hf_key(path, 3) == "model.layers.3.self_attn.q_proj.weight"
    assert hf_key(path, 3, "v5") == "model.language_model.layers.3.self_attn.q_proj.weight"
    assert hf_key(("visual", "patch_embed", "weight"), None, "v5") == "model.visual.patch_embed.proj.weight"
    assert hf_key(("visual", "merger", "mlp_2", "bias")) == "visual.merger.mlp.2.bias"


def _lm_batch():
    rng = np.random.default_rng(0)
    b, l = 2, 12
    return dict(input_ids=jnp.asarray(rng.integers(0, 600, (b, l)), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, 3, l)),
                segment_ids=jnp.asarray(np.arange(l) < [[l], [7]], jnp.int32))


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_bf16_compute_gradients(tiny_hf_dir, model, remat):
    """bf16 compute (``narrow_product``: bf16 backward products, weight gradients leaving their
    product in f32): f32 gradients within bf16 rounding of the f32 model's, under each remat policy."""
    batch = _lm_batch()

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.mean(m.logits(m(**batch)) ** 2))(m)

    want = nnx.to_flat_state(grads(model))
    got = nnx.to_flat_state(grads(from_hf(tiny_hf_dir, compute_dtype=jnp.bfloat16, remat=remat)))
    worst = 0.0
    for (path, a), (_, c) in zip(want, got):
        a, c = np.asarray(a.get_value()), np.asarray(c.get_value())
        assert c.dtype == np.float32, path
        if np.abs(a).max() > 0:
            worst = max(worst, float(np.linalg.norm(c - a) / np.linalg.norm(a)))
    print(f"remat {remat}: worst leaf rel err vs f32 {worst:.2e}")
    assert worst < 0.05


def test_remat_gradients_equal(tiny_hf_dir, model):
    """Training-path smoke: grads through the scanned decoder with full remat equal grads without."""
    rng = np.random.default_rng(0)
    b, l = 2, 12
    batch = dict(input_ids=jnp.asarray(rng.integers(0, 600, (b, l)), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, 3, l)),
                 segment_ids=jnp.asarray(np.arange(l) < [[l], [7]], jnp.int32))

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.mean(m.logits(m(**batch)) ** 2))(m)

    g0 = grads(model)
    g1 = grads(from_hf(tiny_hf_dir, remat="full"))
    for (path, a), (_, c) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(c.get_value()), rtol=1e-4, atol=1e-7,
                                   err_msg=str(path))
    q = np.asarray(g0["language_model"]["layers"]["self_attn"]["q_proj"]["weight"].get_value())
    assert np.isfinite(q).all() and np.abs(q).max() > 0


def test_bf16_weights_load_bit_exact(tmp_path):
    """A bf16 checkpoint: bf16 params hold the stored bits, f32 params their exact widening, and both
    export back to the same bytes (sharded files, Linear weights, the patch embedding)."""
    from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl

    d = write_tiny_qwen2_5_vl(tmp_path / "bf16", seed=3, weights_dtype=jnp.bfloat16, max_shard_bytes=50_000)
    ref = hf_tensors(d)
    for dtype in (jnp.bfloat16, jnp.float32):
        out = to_hf_state_dict(from_hf(d, dtype=dtype), dtype=jnp.bfloat16)
        assert set(out) == set(ref)
        for k in ref:
            assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape, k
            np.testing.assert_array_equal(out[k].view(np.uint16), ref[k].view(np.uint16), err_msg=k)
    m = from_hf(d)
    np.testing.assert_array_equal(np.asarray(m.embed_table()), ref["model.embed_tokens.weight"].astype(np.float32))


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # NaNs, in the pool's threads
@pytest.mark.parametrize("src, dst", [("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16"),
                                      ("float16", "bfloat16"), ("float32", "float32")])
def test_host_casts_match_astype_bit_for_bit(src, dst, monkeypatch):
    """Every bfloat16 / float16 bit pattern (NaNs aside), reshaped on the way as the patch embedding
    is, its rows split between the copying threads."""
    from bbu_jax.models.qwen2_5_vl import params

    monkeypatch.setattr(params, "_PARALLEL_BYTES", 1024)
    src, dst = np.dtype(getattr(jnp, src)), np.dtype(getattr(jnp, dst))
    if src.itemsize == 2:
        x = np.arange(2**16, dtype=np.uint16).view(src).reshape(512, 128)
    else:
        x = np.random.default_rng(0).integers(0, 2**32, (512, 128), dtype=np.uint32).view(np.float32)
    got = np.empty((256, 256), dst)
    want = x.reshape(256, 256).astype(np.float32).astype(dst)
    params._copy_into(x, got)
    nan = np.isnan(want.astype(np.float32))
    bits = f"u{dst.itemsize}"
    np.testing.assert_array_equal(got.view(bits)[~nan], want.view(bits)[~nan])
    assert np.isnan(got.astype(np.float32)[nan]).all()


@pytest.mark.parametrize("chunk_bytes", [None, 20_000])
def test_from_hf_under_a_mesh_puts_only_shards_on_each_device(tiny_hf_dir, model, monkeypatch, chunk_bytes):
    """8 fake CPU devices: every device holds only its shard of each param (a piece of the sharded
    ones, never the whole), equal to the unsharded model's, also when stacks go in chunks of layers."""
    import jax

    from bbu_jax.foundation import sharding
    from bbu_jax.models.qwen2_5_vl import params

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    if chunk_bytes:
        monkeypatch.setattr(params, "LOAD_CHUNK_BYTES", chunk_bytes)
    mesh = sharding.make_mesh(2, 2, 2, jax.devices()[:8])
    sharded = from_hf(tiny_hf_dir, mesh=mesh)
    want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    split = 0
    for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        value = var.get_value()
        assert len(value.addressable_shards) == 8, path
        for shard in value.addressable_shards:
            assert shard.data.shape == value.sharding.shard_shape(value.shape), path
        split += not value.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path].get_value()), err_msg=str(path))
    assert split > 10


def test_truncated_weights_fail_naming_the_tensor(tiny_hf_dir, tmp_path):
    d = tmp_path / "cut"
    shutil.copytree(tiny_hf_dir, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor '.+' .* \(truncated file\?\)"):
        from_hf(d)
