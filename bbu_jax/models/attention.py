"""The one attention entry point: segment-id masks (packing, windows, padding), causal or not, GQA.

Mask (MaxText attention_op): ``(seg_q == seg_kv) & (seg_kv > 0) [& kv_index <= q_index]``.
Rows with no visible key (padding queries) return 0, never NaN. ``implementation`` picks the
kernel; "xla" (explicit masked softmax in f32) is the reference the others are tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IMPLEMENTATIONS = ("xla", "jax", "cudnn")


def attention_mask(q_segment_ids: Int[Array, "b lq"], kv_segment_ids: Int[Array, "b lk"], *,
                   causal: bool, q_offset: Int[Array, ""] | int = 0) -> jax.Array:
    """(B, Lq, Lk) bool. With ``causal``, query i sits at key index ``q_offset + i`` (KV cache)."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] > 0)
    if causal:
        q_idx = jnp.arange(q_segment_ids.shape[1])[:, None] + q_offset
        kv_idx = jnp.arange(kv_segment_ids.shape[1])[None, :]
        mask &= (kv_idx <= q_idx)[None]
    return mask


def attention(q: Float[Array, "b lq hq d"], k: Float[Array, "b lk hkv d"], v: Float[Array, "b lk hkv d"],
              q_segment_ids: Int[Array, "b lq"], kv_segment_ids: Int[Array, "b lk"], *, causal: bool,
              implementation: str = "xla", q_offset: Int[Array, ""] | int = 0,
              scale: float | None = None) -> Float[Array, "b lq hq d"]:
    """Scaled dot-product attention with grouped KV heads; output in q's dtype."""
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    scale = d**-0.5 if scale is None else scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
    if implementation == "xla":
        out = _xla_attention(q, k, v, mask, scale)
    elif implementation in ("jax", "cudnn"):
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale,
            implementation=None if implementation == "jax" else "cudnn")
    else:
        raise ValueError(f"unknown attention implementation {implementation!r}; one of {IMPLEMENTATIONS}")
    return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)


def _xla_attention(q, k, v, mask, scale):
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, lq, hkv, hq // hkv, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    big_neg = jnp.finfo(jnp.float32).min
    logits = jnp.where(mask[:, None, None], logits, big_neg)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, hq, d)
