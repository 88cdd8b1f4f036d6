"""Flash attention for packed rows (Pallas, Triton on GPU) that visits only the blocks it can see.

A packed row holds several samples (text, causal) or several images / vision windows (not causal)
as contiguous runs of one segment id; 0 marks padding. A fused kernel that only applies the
segment mask still multiplies every (query block, key block) pair: for the 3B benchmark row (8192
tokens, 4 samples) that is 8x the useful text attention work, 64x for the vision windows. Here each
query block loops over the key blocks between the first key its queries' segments start at and
the last key they may see (the causal diagonal, or the end of the segment); the backward loops
likewise per key block. The ranges are computed from the segment ids inside the jitted step
(fixed shapes: one [lo, hi) pair per block), so the kernels see data-dependent loop bounds only.

Numerics: scores, softmax statistics and accumulators in f32, products on the inputs' dtype;
rows with no visible key give 0 (never NaN), as the "xla" kernel. Grouped KV heads read their
KV head through the block index map (no repeated K/V); their K/V gradients are summed over the
group after the kernel. Off the GPU the kernels run in Pallas' interpreter (for tests).
Under a mesh (``sharding.mesh_context``) the kernels run per shard through ``shard_map``: rows
split as "batch", heads as "heads" / "kv_heads", by the one rules table.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from bbu_jax.foundation.sharding import logical_to_spec

LOG2E = math.log2(math.e)
NEG = -0.7 * float(np.finfo(np.float32).max)  # masked score; finite, so max() never yields NaN

# (query rows, key rows) per program; Triton needs powers of two. Not tuned on a GPU:
# causal rows (text samples, long) take FlashAttention-2's Hopper forward tile for head dim 128;
# rows that are not causal (the vision tower) take 64 queries, so that a block of a 448-pixel
# image's 64-patch windows never straddles two. The backward keeps its two (rows x rows) f32 tiles
# small enough for the register file.
FORWARD_BLOCKS = {True: (128, 64), False: (64, 64)}
BACKWARD_BLOCKS = (64, 64)


def visible_block_ranges(segment_ids: Int[Array, "b l"], block: int, partner_block: int, *, causal: bool,
                         of_queries: bool) -> tuple[Int[Array, "b n"], Int[Array, "b n"]]:
    """For each block of ``block`` rows: the [lo, hi) blocks (of ``partner_block`` rows) of the
    other side that hold a visible pair; lo == hi when there is none (all padding).

    ``of_queries``: rows are queries and partners keys (forward, dQ), else the reverse (dK/dV).
    A query sees the keys of its own segment run (id > 0), up to itself when ``causal``.
    """
    b, length = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.concatenate([jnp.ones((b, 1), bool), change], axis=1)
    ends = jnp.concatenate([change, jnp.ones((b, 1), bool)], axis=1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    last = jax.lax.cummin(jnp.where(ends, idx, length - 1), axis=1, reverse=True)
    if of_queries:
        lo, hi = first, (idx if causal else last) + 1
    else:
        lo, hi = (idx if causal else first), last + 1
    real = segment_ids > 0
    lo = jnp.where(real, lo, length).reshape(b, -1, block).min(-1)
    hi = jnp.where(real, hi, 0).reshape(b, -1, block).max(-1)
    lo_block = lo // partner_block
    hi_block = jnp.maximum(lo_block, -(-hi // partner_block))
    return lo_block.astype(jnp.int32), hi_block.astype(jnp.int32)


def _mask(q_seg, q_pos, k_seg, k_pos, causal: bool):
    mask = (q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] > 0)
    if causal:
        mask &= q_pos[:, None] >= k_pos[None, :]
    return mask


def _dot(a, b, **kw):
    """Products at their inputs' precision: f32 inputs (a float32 compute dtype) stay off TF32."""
    return plgpu.dot(a, b, allow_tf32=False, **kw)


def _scores(q, k, scale):
    """(q k^T) * scale in base 2 (exp2 is the cheaper exponential), f32."""
    return _dot(q, k, trans_b=True).astype(jnp.float32) * (scale * LOG2E)


def _forward_kernel(lo_ref, hi_ref, seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, causal,
                    block_q, block_k):
    i = pl.program_id(2)
    q = q_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_seg = seg_ref[pl.ds(i * block_q, block_q)]

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * block_k, block_k)
        mask = _mask(q_seg, q_pos, seg_ref[keys], j * block_k + jnp.arange(block_k), causal)
        s = jnp.where(mask, _scores(q, k_ref[keys, :], scale), NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
        alpha = jnp.exp2(m - m_new)
        v = v_ref[keys, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_new, l * alpha + p.sum(axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), NEG, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo_ref[()], hi_ref[()], body, init)
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(safe_l), 0.0)


def _dkdv_kernel(lo_ref, hi_ref, seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 scale, causal, block_q, block_k):
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_pos = j * block_k + jnp.arange(block_k)
    k_seg = seg_ref[pl.ds(j * block_k, block_k)]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        mask = _mask(seg_ref[rows], i * block_q + jnp.arange(block_q), k_seg, k_pos, causal)
        p = jnp.where(mask, jnp.exp2(_scores(q, k, scale) - lse_ref[rows][:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
        dp = _dot(do, v, trans_b=True).astype(jnp.float32)
        ds = p * (dp - delta_ref[rows][:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(lo_ref[()], hi_ref[()], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(lo_ref, hi_ref, seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, causal, block_q, block_k):
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_seg = seg_ref[pl.ds(i * block_q, block_q)]

    def body(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        mask = _mask(q_seg, q_pos, seg_ref[keys], j * block_k + jnp.arange(block_k), causal)
        p = jnp.where(mask, jnp.exp2(_scores(q, k, scale) - lse[:, None]), 0.0)
        ds = p * (_dot(do, v, trans_b=True).astype(jnp.float32) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k).astype(jnp.float32)

    dq = jax.lax.fori_loop(lo_ref[()], hi_ref[()], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _specs(length: int, d: int, group: int, block: int):
    """BlockSpecs on a (b, h, block) grid: this block's rows of a [B, L, H, D] array, the whole
    sequence of the matching query head / KV head, the row's segment ids and block bounds."""
    return dict(
        bound=pl.BlockSpec((None, None), lambda b, h, i: (b, i)),
        seg=pl.BlockSpec((None, length), lambda b, h, i: (b, 0)),
        rows=pl.BlockSpec((None, block, None, d), lambda b, h, i: (b, i, h, 0)),
        q_all=pl.BlockSpec((None, length, None, d), lambda b, h, i: (b, 0, h, 0)),
        kv_rows=pl.BlockSpec((None, block, None, d), lambda b, h, i: (b, i, h // group, 0)),
        kv_all=pl.BlockSpec((None, length, None, d), lambda b, h, i: (b, 0, h // group, 0)),
        stat_rows=pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i)),
        stat_all=pl.BlockSpec((None, None, length), lambda b, h, i: (b, h, 0)),
    )


def _call(kernel, grid, in_specs, out_specs, out_shape, *, interpret: bool, name: str, head_dim: int):
    num_warps = 8 if head_dim > 64 else 4  # JAX's Pallas mha heuristic
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
                          interpret=interpret, name=name)


def _forward(q, k, v, segment_ids, scale, causal, interpret):
    b, length, hq, d = q.shape
    group = hq // k.shape[2]
    bq, bk = FORWARD_BLOCKS[causal]
    lo, hi = visible_block_ranges(segment_ids, bq, bk, causal=causal, of_queries=True)
    s = _specs(length, d, group, bq)
    kernel = functools.partial(_forward_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk)
    out, lse = _call(kernel, (b, hq, length // bq),
                     [s["bound"], s["bound"], s["seg"], s["rows"], s["kv_all"], s["kv_all"]],
                     [s["rows"], s["stat_rows"]],
                     [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, length), jnp.float32)],
                     interpret=interpret, name="segment_flash_forward", head_dim=d
                     )(lo, hi, segment_ids, q, k, v)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, segment_ids, scale: float, causal: bool, interpret: bool):
    return _forward(q, k, v, segment_ids, scale, causal, interpret)[0]


def _flash_fwd(q, k, v, segment_ids, scale, causal, interpret):
    out, lse = _forward(q, k, v, segment_ids, scale, causal, interpret)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(scale, causal, interpret, res, do):
    q, k, v, segment_ids, out, lse = res
    b, length, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    bq, bk = BACKWARD_BLOCKS
    do = do.astype(q.dtype)
    delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), do.astype(jnp.float32))

    lo, hi = visible_block_ranges(segment_ids, bk, bq, causal=causal, of_queries=False)
    s = _specs(length, d, group, bk)
    kernel = functools.partial(_dkdv_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk)
    per_head = jax.ShapeDtypeStruct((b, length, hq, d), jnp.float32)
    dk, dv = _call(kernel, (b, hq, length // bk),
                   [s["bound"], s["bound"], s["seg"], s["q_all"], s["kv_rows"], s["kv_rows"], s["q_all"],
                    s["stat_all"], s["stat_all"]],
                   [s["rows"], s["rows"]], [per_head, per_head],
                   interpret=interpret, name="segment_flash_dkdv", head_dim=d
                   )(lo, hi, segment_ids, q, k, v, do, lse, delta)
    dk = dk.reshape(b, length, hkv, group, d).sum(3).astype(k.dtype)
    dv = dv.reshape(b, length, hkv, group, d).sum(3).astype(v.dtype)

    lo, hi = visible_block_ranges(segment_ids, bq, bk, causal=causal, of_queries=True)
    s = _specs(length, d, group, bq)
    kernel = functools.partial(_dq_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk)
    dq = _call(kernel, (b, hq, length // bq),
               [s["bound"], s["bound"], s["seg"], s["rows"], s["kv_all"], s["kv_all"], s["rows"],
                s["stat_rows"], s["stat_rows"]],
               s["rows"], jax.ShapeDtypeStruct(q.shape, q.dtype),
               interpret=interpret, name="segment_flash_dq", head_dim=d
               )(lo, hi, segment_ids, q, k, v, do, lse, delta)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _interpret_default() -> bool:
    """Pallas' interpreter off the GPU (tests), Triton on it."""
    return jax.default_backend() != "gpu"


def padded_length(length: int) -> int:
    """Rows are padded (segment 0) to a whole number of every kernel's blocks."""
    unit = math.lcm(*FORWARD_BLOCKS[True], *FORWARD_BLOCKS[False], *BACKWARD_BLOCKS)
    return -(-length // unit) * unit


def padded_head_dim(d: int) -> int:
    """Triton's blocks are powers of two (>= 16): head dims are zero-padded (80 -> 128)."""
    return max(16, pl.next_power_of_2(d))


def _pad_to(x, axis: int, size: int):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def segment_flash_attention(q: Float[Array, "b l hq d"], k: Float[Array, "b l hkv d"], v: Float[Array, "b l hkv d"],
                            segment_ids: Int[Array, "b l"], *, causal: bool, scale: float,
                            interpret: bool | None = None) -> Float[Array, "b l hq d"]:
    """Self-attention of a packed row: query i sees key j iff both carry the same segment id > 0
    (and j <= i with ``causal``). Output in q's dtype; rows that see no key give 0. Each id must
    form one contiguous run, as packing and the vision layout make them: the loops visit the run.

    The row is padded (segment 0) to a whole number of blocks and the head dim to a power of two
    (zeros change no score), both sliced off again. ``interpret``: default off the GPU only.
    """
    if interpret is None:
        interpret = _interpret_default()
    b, length, hq, d = q.shape
    padded_len = padded_length(length)
    padded_d = padded_head_dim(d)
    q, k, v = (_pad_to(_pad_to(x, 1, padded_len), 3, padded_d) for x in (q, k, v))
    seg = _pad_to(segment_ids.astype(jnp.int32), 1, padded_len)
    run = functools.partial(_flash, scale=scale, causal=causal, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # per shard: rows over the batch axes, heads over the tensor axis
        heads = logical_to_spec(("kv_heads",), (k.shape[2],), mesh)[0]
        rows = logical_to_spec(("batch",), (b,), mesh)[0]
        qkv = jax.sharding.PartitionSpec(rows, None, heads, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, jax.sharding.PartitionSpec(rows, None)),
                            out_specs=qkv, check_vma=False)
    return run(q, k, v, seg)[:, :length, :, :d]
