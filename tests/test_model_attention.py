"""The attention entry point: masks, GQA, padding rows, implementations, and the KV-cache path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bbu_jax.models.attention import attention, resolve_implementation
from bbu_jax.models.qwen2_5_vl.config import TextConfig
from bbu_jax.models.qwen2_5_vl.text import DecoderLayer, mrope_cos_sin


def qkv(b=2, l=7, hq=4, hkv=2, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, l, hq, d)), jax.random.normal(ks[1], (b, l, hkv, d)),
            jax.random.normal(ks[2], (b, l, hkv, d)))


SEGMENTS = jnp.array([[1, 1, 1, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1]])


def reference(q, k, v, seg, causal):
    """numpy: repeat kv heads, mask, softmax per row; rows with no visible key give 0."""
    q, k, v, seg = map(np.asarray, (q, k, v, seg))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            vis = (seg[b] == seg[b, i]) & (seg[b] > 0)
            if causal:
                vis &= np.arange(q.shape[1]) <= i
            if not vis.any():
                continue
            s = np.einsum("hd,khd->hk", q[b, i], k[b, vis]) / np.sqrt(q.shape[-1])
            w = np.exp(s - s.max(-1, keepdims=True))
            out[b, i] = np.einsum("hk,khd->hd", w / w.sum(-1, keepdims=True), v[b, vis])
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("implementation", ["xla", "jax", "pallas"])
def test_attention_matches_reference(causal, implementation):
    q, k, v = qkv()
    fn = jax.jit(attention, static_argnames=("causal", "implementation"))
    out = fn(q, k, v, SEGMENTS, SEGMENTS, causal=causal, implementation=implementation)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, SEGMENTS, causal), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[SEGMENTS == 0] == 0)


def test_fused_kernels_never_get_a_row_without_a_visible_key(monkeypatch):
    """cuDNN turns an all-masked row (padding queries) into NaN, in its gradients too: every row of
    the mask the fused kernels get sees a key, and the padding rows' outputs and gradients stay 0.
    ("jax" here: the same call as "cudnn", whose kernel needs a GPU.)"""
    seen = []
    real = jax.nn.dot_product_attention

    def spy(*args, mask, **kw):
        seen.append(mask)
        return real(*args, mask=mask, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v = qkv()
    for causal in (True, False):
        loss = lambda q, k, v: attention(q, k, v, SEGMENTS, SEGMENTS, causal=causal, implementation="jax").sum()
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)
        assert np.all(np.asarray(grads[0])[SEGMENTS == 0] == 0)
    assert seen and all(bool(jnp.any(m, -1).all()) for m in seen)


def test_attention_rejects_unknown_implementation():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, SEGMENTS, SEGMENTS, causal=True, implementation="flash9")


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_decoder_layer_kv_cache_matches_full_sequence(implementation):
    """Prefill 4 tokens into a cache, decode 2 one by one: same outputs as one full pass ("pallas":
    the flash kernel for the full pass, "jax" for the cached calls)."""
    cfg = TextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, mrope_section=(1, 0, 1))
    layer = DecoderLayer(cfg, rngs=nnx.Rngs(0), implementation=implementation)
    l, l_max = 6, 8
    x = jax.random.normal(jax.random.key(1), (1, l, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(l), (1, 3, l))
    cos, sin = mrope_cos_sin(pos, head_dim=cfg.head_dim, theta=cfg.rope_theta, mrope_section=cfg.mrope_section)
    seg = jnp.ones((1, l), jnp.int32)
    call = nnx.jit(lambda layer, *args: layer(*args))  # one compile per shape instead of per op
    full, _ = call(layer, x, cos, sin, seg)

    cache = (jnp.zeros((1, l_max, 2, cfg.head_dim)),) * 2
    kv_seg = jnp.zeros((1, l_max), jnp.int32).at[:, :4].set(1)
    out, cache = call(layer, x[:, :4], cos[:, :4], sin[:, :4], seg[:, :4], cache, jnp.int32(0), kv_seg)
    outs = [out]
    for t in (4, 5):
        kv_seg = kv_seg.at[:, t].set(1)
        out, cache = call(layer, x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], seg[:, t:t + 1], cache,
                           jnp.int32(t), kv_seg)
        outs.append(out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal,local_window", [(True, None), (False, 6), (True, 6)])
def test_blocked_xla_attention_matches_reference(causal, local_window):
    """Long enough for several query blocks (the "xla" kernel skips keys a block cannot see):
    packed segments, windows (contiguous runs of <= local_window rows) and padding."""
    q, k, v = qkv(b=2, l=300, hq=4, hkv=2, d=8, seed=1)
    rng = np.random.default_rng(0)
    seg = np.zeros((2, 300), np.int32)
    for row in seg:  # runs of 1..local_window (or up to 80) rows, then padding
        pos, sid = 0, 1
        while pos < 280:
            n = int(rng.integers(1, (local_window or 80) + 1))
            row[pos:pos + n] = sid
            pos, sid = pos + n, sid + 1
    seg = jnp.asarray(seg)
    fn = jax.jit(attention, static_argnames=("causal", "implementation", "local_window"))
    out = fn(q, k, v, seg, seg, causal=causal, implementation="xla", local_window=local_window)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, seg, causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform, kernel", [("gpu", "pallas"), ("cpu", "xla"), ("tpu", "xla")])
def test_auto_resolves_to_the_platforms_kernel(platform, kernel):
    assert resolve_implementation("auto", platform) == kernel
    assert resolve_implementation("cudnn", platform) == "cudnn"  # a named kernel is kept anywhere
    with pytest.raises(ValueError, match="implementation"):
        resolve_implementation("flash9", platform)


def test_attention_refuses_an_unresolved_auto():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="auto"):
        attention(q, k, v, SEGMENTS, SEGMENTS, causal=True, implementation="auto")
