"""Qwen2.5-VL text decoder (Qwen2 layers with M-RoPE) and the small layers the vision tower shares.

Parameters are float32 and carry logical axis names (``out_sharding`` metadata) that
``bbu_jax.foundation.sharding`` maps onto the mesh; matmuls run in ``compute_dtype`` with f32
accumulation, norms and rotary embeddings in f32. Layers are created stacked (``nnx.vmap``) and run
with ``nnx.scan`` so compile time does not grow with depth.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from bbu_jax.models.attention import attention
from bbu_jax.models.qwen2_5_vl.config import TextConfig
from bbu_jax.foundation.sharding import constrain, gathered_weight

Axes = tuple[str | None, ...]
LAYERS_AXIS = "layers"

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A Param annotated with logical axis names. Eager sharding is off: names are resolved to mesh
    axes only by ``bbu_jax.foundation.sharding`` (so the model builds with or without a mesh)."""
    with nnx.use_eager_sharding(False):
        return nnx.Param(value, out_sharding=axes)


def layer_loop(body, *, scan: bool, in_axes, out_axes):
    """``nnx.scan`` over stacked layers. ``scan=False`` unrolls it: compile time grows with depth,
    but the backward pass no longer stacks every layer's residuals into zero-filled buffers
    (a measurable share of a small model's CPU step); the params stay stacked either way."""
    return nnx.scan(body, in_axes=in_axes, out_axes=out_axes, unroll=1 if scan else True)


def remat_policy(name: str):
    """``"none"`` (no remat), ``"full"`` (save nothing) or a ``jax.checkpoint_policies`` name."""
    if name in ("none", "full"):
        return None
    if not hasattr(jax.checkpoint_policies, name):
        raise ValueError(f"unknown remat policy {name!r}")
    return getattr(jax.checkpoint_policies, name)


@jax.custom_vjp
def narrow_product(x: Float[Array, "n din"], w: Float[Array, "din dout"]) -> Float[Array, "n dout"]:
    """x @ w for a compute dtype narrower than f32 (accumulated in f32 by the GEMM, output in it).

    With an f32 output the gradient reached the backward's products in f32, so both ran on f32
    operands (on a GPU: at half the bf16 rate at best, twice the bytes); with a plain narrow
    output, dw came out narrow too and its partial sums were reduced across devices in it. Here
    dx's product runs in the compute dtype and dw's leaves its product in f32 (reduced in f32)."""
    return jnp.dot(x, w, preferred_element_type=x.dtype)


def _narrow_product_fwd(x, w):
    return narrow_product(x, w), (x, w)


def _narrow_product_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.dot(g, w.T, preferred_element_type=x.dtype)
    return dx, jnp.dot(x.T, g, preferred_element_type=jnp.float32).astype(w.dtype)


narrow_product.defvjp(_narrow_product_fwd, _narrow_product_bwd)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel (in, out) = the transpose of torch's Linear weight."""

    def __init__(self, din: int, dout: int, *, use_bias: bool, axes: Axes, rngs: nnx.Rngs,
                 compute_dtype=jnp.float32, param_dtype=jnp.float32):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = param(init(rngs.params(), (din, dout), param_dtype), axes)
        self.kernel_axes = tuple(axes)
        self.bias = param(jnp.zeros((dout,), param_dtype), axes[1:]) if use_bias else None
        self.compute_dtype = compute_dtype
        # Activations are split over tokens (and over heads / mlp units under tensor parallelism),
        # never over the model width: left to itself, GSPMD follows an fsdp-split kernel and splits
        # activations by width, then all-reduces whole (tokens x features) products.
        self.activation_axes = tuple(None if a == "embed" else a for a in axes)

    def __call__(self, x: Float[Array, "... din"]) -> Float[Array, "... dout"]:
        # As a 2D product: the kernel's gradient then contracts one token axis, which XLA's CPU dot
        # reads in place; contracting (batch, length) made it write a transposed copy of dy first.
        lead = x.shape[:-1]
        x = constrain(x.reshape(-1, x.shape[-1]), ("batch", self.activation_axes[0]))
        kernel = gathered_weight(self.kernel[...], self.kernel_axes, self.activation_axes, self.compute_dtype)
        x = x.astype(self.compute_dtype)
        if jnp.dtype(self.compute_dtype) == jnp.float32:  # nothing to narrow: plain autodiff
            y = jnp.dot(x, kernel, preferred_element_type=jnp.float32)
        else:
            y = narrow_product(x, kernel)
        y = constrain(y, ("batch", self.activation_axes[1])).reshape(*lead, y.shape[-1])
        if self.bias is not None:
            y = y.astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.compute_dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.weight = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.weight[...].astype(jnp.float32)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)); with bias in the vision tower, without in the decoder."""

    def __init__(self, dim: int, hidden: int, *, act: str, use_bias: bool, rngs: nnx.Rngs,
                 compute_dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(use_bias=use_bias, rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype)
        self.gate_proj = Dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(hidden, dim, axes=("mlp", "embed"), **kw)
        self.act = act

    def __call__(self, x):
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Float[Array, "b l h d"], cos: Float[Array, "b l d"], sin: Float[Array, "b l d"]):
    """Rotary embedding in f32 (rotate_half convention), result in x's dtype."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None] + rotate_half(x32) * sin[:, :, None]
    return out.astype(x.dtype)


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
        q = apply_rope(self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        q_offset, kv_segments = 0, segment_ids
        if cache is not None:
            start = (0, cache_index, 0, 0)
            cache = (jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start),
                     jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start))
            k, v = cache[0].astype(q.dtype), cache[1].astype(q.dtype)
            q_offset, kv_segments = cache_index, kv_segment_ids
        out = attention(q, k, v, segment_ids, kv_segments, causal=True, q_offset=q_offset,
                        implementation=self.implementation)
        return self.o_proj(out.reshape(b, l, -1)), cache


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


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n copies of a module with every param stacked on a leading "layers" axis."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def create(r):
        return make(r)
    return create(rngs)


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
