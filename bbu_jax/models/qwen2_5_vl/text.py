"""Qwen2.5-VL text decoder: Qwen2 layers with M-RoPE, a KV cache for generation.

The building blocks (Dense, RMSNorm, GatedMLP, rotary embedding, stacked layers) are the ones the
vision tower uses too, from ``bbu_jax.models.layers``; the final norm's output goes to the
composed model, which owns the lm_head.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from bbu_jax.models.attention import attention
from bbu_jax.models.layers import Dense, GatedMLP, RMSNorm, apply_rope, layer_loop, param, remat_policy, stacked
from bbu_jax.models.qwen2_5_vl.config import TextConfig


def mrope_cos_sin(positions: Int[Array, "b 3 l"], *, head_dim: int, theta: float,
                  mrope_section: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """M-RoPE tables (B, L, head_dim) f32: frequency f uses position row ``section(f) % 3``."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (b, 3, l, d/2)
    bounds = [0, *itertools.accumulate(mrope_section)]
    freqs = jnp.concatenate([freqs[:, i % 3, :, bounds[i]:bounds[i + 1]] for i in range(len(mrope_section))],
                            axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


KVCache = tuple[jax.Array, jax.Array]  # (B, L_max, H_kv, D) keys and values


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, compute_dtype, param_dtype,
                 implementation: str):
        kw = dict(rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype)
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Dense(d, cfg.num_attention_heads * hd, use_bias=True, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, cfg.num_key_value_heads * hd, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, cfg.num_key_value_heads * hd, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(cfg.num_attention_heads * hd, d, use_bias=False, axes=("heads", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.implementation = implementation

    def __call__(self, x, cos, sin, segment_ids, cache: KVCache | None = None, cache_index=None,
                 kv_segment_ids=None) -> tuple[jax.Array, KVCache | None]:
        """Causal self-attention. With ``cache`` (prefill or decode), this call's keys/values are
        written at ``cache_index`` and queries attend over the cache, whose segment ids are
        ``kv_segment_ids`` (B, L_max)."""
        b, l, _ = x.shape
        # named for the remat policies (layers.SAVED_NAMES)
        q = checkpoint_name(self.q_proj(x), "query_proj").reshape(b, l, self.num_heads, self.head_dim)
        k = checkpoint_name(self.k_proj(x), "key_proj").reshape(b, l, self.num_kv_heads, self.head_dim)
        v = checkpoint_name(self.v_proj(x), "value_proj").reshape(b, l, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q_offset, kv_segments = 0, segment_ids
        if cache is not None:
            start = (0, cache_index, 0, 0)
            cache = (jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start),
                     jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start))
            k, v = cache[0].astype(q.dtype), cache[1].astype(q.dtype)
            q_offset, kv_segments = cache_index, kv_segment_ids
        out = attention(q, k, v, segment_ids, kv_segments, causal=True, q_offset=q_offset,
                        implementation=self.implementation)
        return checkpoint_name(self.o_proj(out.reshape(b, l, -1)), "out_proj"), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, compute_dtype=jnp.float32,
                 param_dtype=jnp.float32, implementation: str = "xla"):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = TextAttention(cfg, rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype,
                                       implementation=implementation)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=False,
                            rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, segment_ids, cache=None, cache_index=None, kv_segment_ids=None):
        """x: f32 residual stream (B, L, D)."""
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, cache, cache_index,
                                  kv_segment_ids)
        x = x + h.astype(jnp.float32)
        x = x + self.mlp(self.post_attention_layernorm(x)).astype(jnp.float32)
        return x, cache


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.weight = param(jax.nn.initializers.normal(0.02)(rngs.params(), (vocab, dim), param_dtype),
                            ("vocab", "embed"))

    def __call__(self, ids: Int[Array, "b l"]) -> Float[Array, "b l d"]:
        return jnp.take(self.weight[...], ids, axis=0).astype(jnp.float32)


class TextModel(nnx.Module):
    """Token embedding + stacked decoder layers + final norm (the lm_head lives in the composed model)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, compute_dtype=jnp.float32,
                 param_dtype=jnp.float32, implementation: str = "xla", remat: str = "none",
                 scan_layers: bool = True):
        self.cfg = cfg
        self.scan_layers = scan_layers
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=param_dtype)
        self.layers = stacked(lambda r: DecoderLayer(cfg, rngs=r, compute_dtype=compute_dtype,
                                                     param_dtype=param_dtype, implementation=implementation),
                              cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.remat = remat
        remat_policy(remat)  # validate early

    def __call__(self, embeds: Float[Array, "b l d"], positions: Int[Array, "b 3 l"],
                 segment_ids: Int[Array, "b l"]) -> Float[Array, "b l d"]:
        cos, sin = self._rope(positions)

        def body(x, layer):
            return layer(x, cos, sin, segment_ids)[0]

        if self.remat != "none":
            body = nnx.remat(body, policy=remat_policy(self.remat))
        x = layer_loop(body, scan=self.scan_layers, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
            embeds.astype(jnp.float32), self.layers)
        return self.norm(x)

    def init_cache(self, batch: int, max_length: int, dtype) -> KVCache:
        """Zero keys and values for every layer: (layers, B, L_max, H_kv, D) each."""
        shape = (self.cfg.num_hidden_layers, batch, max_length, self.cfg.num_key_value_heads, self.cfg.head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def with_cache(self, embeds: Float[Array, "b l d"], positions: Int[Array, "b 3 l"],
                   segment_ids: Int[Array, "b l"], cache: KVCache, cache_index: Int[Array, ""],
                   kv_segment_ids: Int[Array, "b lmax"]) -> tuple[Float[Array, "b l d"], KVCache]:
        """Prefill (L tokens) or decode (L = 1) through a stacked cache (see ``init_cache``):
        this call's keys/values land at ``cache_index`` and queries attend over the whole cache."""
        cos, sin = self._rope(positions)

        def body(x, layer, layer_cache):
            return layer(x, cos, sin, segment_ids, layer_cache, cache_index, kv_segment_ids)

        x, cache = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))(
            embeds.astype(jnp.float32), self.layers, cache)
        return self.norm(x), cache

    def _rope(self, positions):
        return mrope_cos_sin(positions, head_dim=self.cfg.head_dim, theta=self.cfg.rope_theta,
                             mrope_section=self.cfg.mrope_section)
