"""The one attention entry point: segment-id masks (packing, windows, padding), causal or not, GQA.

Mask (MaxText attention_op): ``(seg_q == seg_kv) & (seg_kv > 0) [& kv_index <= q_index]``.
Rows with no visible key (padding queries) return 0, never NaN. ``implementation`` picks the
kernel (`KERNELS`; a config may also say "auto", see `resolve_implementation`):

- "xla": an explicit masked softmax in f32, blocked over queries so that keys a block cannot see
  (causal future, outside a local window) are never scored -- on the CPU, where (L, L) f32
  scores cost mostly memory traffic, this roughly halves causal attention.
- "pallas": ``flash_attention.segment_flash_attention`` for self-attention (fused, and only the
  blocks of keys a block of queries can see are computed), "jax" for cross-attention and
  KV-cache decoding. Triton's blocks are powers of two, so the vision tower's head dim 80 is
  zero-padded to 128 inside the kernel (1.6x the QK^T / PV work of its attention, which is a
  small share of the tower: 64-patch windows in 28 of 32 blocks); cuDNN would take 80 as it is,
  but only with the dense (L, L) mask below, which over a 16k-patch row costs far more.
- "jax" / "cudnn": ``jax.nn.dot_product_attention`` (cudnn: fused on GPU, scores never
  materialized). Its public signature (jax 0.10.2 and 0.11.x alike) has ``mask``, ``bias``,
  ``is_causal``, ``query_seq_lengths`` / ``key_value_seq_lengths`` (one valid length per row,
  i.e. right padding) and ``local_window_size`` -- no segment ids. cuDNN's packed layout
  (per-segment ``q_offsets`` / ``kv_offsets``, Hopper only) exists only in the private
  ``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention``, which cannot even be lowered
  without a GPU; it is not used. So a packed row travels as a dense (L, L) mask (turned into a
  bias) and every (query, key) pair of the row is computed; with ``causal`` (and the query at key
  index i, no KV-cache offset) ``is_causal=True`` is passed as well, which lets cuDNN skip the
  blocks above the diagonal -- about half the pairs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from bbu_jax.models.flash_attention import segment_flash_attention

KERNELS = ("xla", "jax", "cudnn", "pallas")
IMPLEMENTATIONS = ("auto",) + KERNELS  # what a config or a command-line flag may name


def resolve_implementation(name: str, platform: str) -> str:
    """The kernel ``name`` stands for on ``platform`` (a jax backend name, ``jax.default_backend()``):
    "auto" is the block-skipping flash kernel on GPU and the blocked "xla" softmax elsewhere (the
    Triton kernel compiles only for GPUs; elsewhere Pallas would interpret it); a kernel's name
    stands for itself."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; one of {IMPLEMENTATIONS}")
    if name != "auto":
        return name
    return "pallas" if platform == "gpu" else "xla"


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
              scale: float | None = None, local_window: int | None = None) -> Float[Array, "b lq hq d"]:
    """Scaled dot-product attention with grouped KV heads; output in q's dtype.

    ``local_window``: a promise that every visible key lies within ``local_window - 1`` positions
    of its query (e.g. the vision tower's windows: contiguous runs of at most 64 patches). The
    "xla" kernel then only scores keys near each block of queries; the result is unchanged.
    """
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    scale = d**-0.5 if scale is None else scale
    if implementation == "pallas":
        if q_segment_ids is kv_segment_ids and isinstance(q_offset, int) and q_offset == 0:
            return segment_flash_attention(q, k, v, q_segment_ids, causal=causal, scale=scale)
        implementation = "jax"  # cross-attention, decoding against a KV cache: small score matrices
    if implementation == "xla":
        return _blocked_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset,
                                  scale=scale, local_window=local_window)
    mask = attention_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
    if implementation in ("jax", "cudnn"):
        # the kernels' causal mask puts query i at key i: only true without a KV-cache offset
        aligned = isinstance(q_offset, int) and q_offset == 0 and lq == k.shape[1]
        # A row with no visible key (padding) sees every key instead, its output zeroed below: cuDNN
        # softmaxes an all-masked row into NaN, which the zeroing hides in the forward pass but not
        # from the gradients. (Under is_causal a row still sees key 0 at least.)
        kernel_mask = mask | ~mask.any(-1, keepdims=True)
        out = jax.nn.dot_product_attention(
            q, k, v, mask=kernel_mask[:, None], scale=scale, is_causal=causal and aligned,
            implementation=None if implementation == "jax" else "cudnn")
    else:
        raise ValueError(f"unknown attention implementation {implementation!r}; one of {KERNELS} "
                         f"(\"auto\" is resolved where the settings are built)")
    return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)


def _query_block(lq: int) -> int:
    """At most 8 query blocks of >= 128 rows: enough to skip most masked keys (causal, windows),
    few enough to keep the unrolled graph small."""
    return max(128, -(-lq // 8))


def _blocked_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, q_offset, scale, local_window):
    """Masked softmax attention in f32, one block of queries at a time, each against only the keys
    it can see: with ``causal`` (and a static ``q_offset``) keys up to the block's last query, with
    ``local_window`` keys within the window of the block. Skipped keys are exactly those the full
    mask hides, so the output equals the unblocked computation. Rows with no visible key give 0."""
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    # heads first, so both products are plain batched matmuls (b, h) x (rows, d)
    qt = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4)  # b h g q d
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # b h k d
    static_offset = isinstance(q_offset, int)
    skips = static_offset and (causal or local_window is not None)
    block = _query_block(lq) if skips else lq
    outs = []
    for start in range(0, lq, block):
        stop = min(start + block, lq)
        lo, hi = 0, lk
        if causal and static_offset:
            hi = min(hi, q_offset + stop)
        if local_window is not None and static_offset:
            lo = max(0, q_offset + start - local_window + 1)
            hi = min(hi, q_offset + stop + local_window - 1)
        rows, keys = stop - start, hi - lo
        mask = attention_mask(q_segment_ids[:, start:stop], kv_segment_ids[:, lo:hi], causal=causal,
                              q_offset=q_offset + start - lo)
        # the g query heads of a kv head as one axis of g x rows: each product (and its gradients)
        # contracts a single axis, which XLA's CPU dots read in place without transposed copies
        qb = qt[:, :, :, start:stop].reshape(b, hkv, g * rows, d)
        logits = jnp.einsum("bhnd,bhkd->bhnk", qb, kt[:, :, lo:hi], preferred_element_type=jnp.float32) * scale
        logits = jnp.where(mask[:, None, None], logits.reshape(b, hkv, g, rows, keys), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).reshape(b, hkv, g * rows, keys)
        out = jnp.einsum("bhnk,bhkd->bhnd", weights.astype(v.dtype), vt[:, :, lo:hi],
                         preferred_element_type=jnp.float32).reshape(b, hkv, g, rows, d)
        out = out.transpose(0, 3, 1, 2, 4)  # b q h g d
        outs.append(jnp.where(mask.any(-1)[:, :, None, None, None], out, 0))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out.reshape(b, lq, hq, d).astype(q.dtype)
