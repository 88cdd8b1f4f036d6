"""Next-token cross-entropy fused with the LM head: chunked, gradient computed in the forward pass,
unsupervised chunks skipped. Never materializes (tokens x vocab) logits.

Qwen's vocabulary has 151,936 ids: float32 logits for an 8k-token row would be ~5 GB, plus the same
again for their gradient. Here a scan walks chunks of token positions; each chunk's logits are
built, reduced to per-token NLL and dropped. When the gradient is wanted, the same pass also forms
the logits' gradient ``w_t * (softmax - onehot)`` and contracts it with the LM head and the hidden
states right away (three matmuls per chunk instead of the four of forward + rematerialized
backward), so the backward pass only scales the stored results by the incoming cotangent. This is
exact because the differentiated output is linear in the per-token NLL with weights known up front
(``scale`` x supervised mask).

Supervised tokens are moved to the front of each row first (a stable sort of the target kinds, on
fixed shapes), so chunks that hold no supervised token of any row are skipped (``lax.cond``): with
answers that are a fraction of each packed row, most of the LM head's work disappears.

Traced under a mesh (``sharding.mesh_context``: the jitted steps), the head's gradient is summed per
group of rows on the devices that hold them and reduced across devices once per step.

Targets follow ``bbu_jax.data.batch``: ``targets[t]`` is the token predicted at position t and
``target_kind`` is 0 (unsupervised), 1 (teacher answer) or 2 (student answer).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from bbu_jax.foundation.sharding import constrain, shards

TEACHER, STUDENT = 1, 2
Metrics = dict[str, tuple[Array, Array]]


def lm_loss(hidden: Float[Array, "b l d"], lm_head: Float[Array, "v d"], targets: Int[Array, "b l"],
            target_kind: Int[Array, "b l"], *, chunk: int, scale: Array | float = 1.0,
            compute_dtype=jnp.float32) -> tuple[Array, Metrics]:
    """(scale x sum of supervised NLL, {name: (NLL sum, token count)}) for lm (all supervised),
    teacher_lm and student_lm.

    Only the first output carries a gradient (w.r.t. ``hidden`` and ``lm_head``); ``scale`` is a
    constant (e.g. loss weight / supervised tokens of the whole step) and the metrics are values.
    ``chunk``: tokens per chunk over all rows (rounded to whole positions: ``chunk // b``).
    Matmuls run in ``compute_dtype`` with float32 accumulation; softmax and NLL in float32.
    """
    b, l, _ = hidden.shape
    kind = jnp.asarray(target_kind)
    supervised = kind > 0
    weights = jnp.where(supervised, jnp.asarray(scale, jnp.float32), 0.0)
    positions = max(1, min(chunk // b, l))
    total, nll = _fused_nll(hidden, lm_head, jnp.asarray(targets, jnp.int32), supervised, weights,
                            positions, jnp.dtype(compute_dtype))
    nll = jax.lax.stop_gradient(nll)

    def masked(mask):
        return jnp.where(mask, nll, 0.0).sum(), mask.sum().astype(jnp.float32)

    return total, {"lm_loss": masked(supervised), "teacher_lm_loss": masked(kind == TEACHER),
                   "student_lm_loss": masked(kind == STUDENT)}


# ----------------------------------------------------------------------------- the fused kernel

def _to_chunks(x: Array, order: Array, positions: int) -> Array:
    """(b, l, ...) -> (n, b, positions, ...): rows reordered by ``order``, zero-padded to whole chunks."""
    b, l = order.shape
    x = jnp.take_along_axis(x, order.reshape(b, l, *([1] * (x.ndim - 2))), axis=1)
    x = jnp.pad(x, [(0, 0), (0, -l % positions)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, -1, positions, *x.shape[2:]), 1, 0)


def _from_chunks(x: Array, inverse: Array) -> Array:
    """Inverse of ``_to_chunks`` given the inverse permutation (b, l)."""
    b, l = inverse.shape
    x = jnp.moveaxis(x, 0, 1).reshape(b, -1, *x.shape[3:])[:, :l]
    return jnp.take_along_axis(x, inverse.reshape(b, l, *([1] * (x.ndim - 2))), axis=1)


def _chunk_nll(h, w, t, dtype):
    """Per-token NLL (b, c) f32 and the f32 logits of one chunk."""
    logits = jnp.einsum("bcd,vd->bcv", h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0], logits, lse


def _scan_chunks(hidden, lm_head, targets, live, weights, positions, dtype, with_grad):
    """(sum w * nll, nll (b, l), [d hidden (b, l, d) f32, d lm_head (v, d) f32])."""
    b, l, d = hidden.shape
    v = lm_head.shape[0]
    # Under a mesh: the head is cast where it lies and gathered over fsdp once (compute-dtype
    # bytes), not in every chunk, and each device sums its own rows' head gradient (one partial per
    # row group), so the whole step all-reduces it once after the loop instead of once per chunk.
    lm_head = constrain(constrain(lm_head.astype(dtype), ("vocab", "embed")), ("vocab", None))
    groups = shards("batch", b)
    order = jnp.argsort(~live, axis=1, stable=True)  # live tokens first in every row
    xs = tuple(_to_chunks(x, order, positions) for x in (hidden, targets, live, weights))
    zeros_nll = jnp.zeros((b, positions), jnp.float32)

    def forward(carry, chunk_xs):
        h, t, m, wt = chunk_xs
        nll = jax.lax.cond(jnp.any(m), lambda: _chunk_nll(h, lm_head, t, dtype)[0], lambda: zeros_nll)
        return carry, nll

    def with_gradient(dw, chunk_xs):
        h, t, m, wt = chunk_xs

        def compute():
            nll, logits, lse = _chunk_nll(h, lm_head, t, dtype)
            probs = jnp.exp(logits - lse[..., None])
            onehot = jnp.arange(lm_head.shape[0])[None, None] == t[..., None]
            g = (wt[..., None] * (probs - onehot)).astype(dtype)  # d(sum w nll) / d logits
            dh = jnp.einsum("bcv,vd->bcd", g, lm_head.astype(dtype), preferred_element_type=jnp.float32)
            # a group's tokens as one axis: XLA's CPU dot then reads g in place instead of transposing it
            dw_chunk = jnp.einsum("gtv,gtd->gvd", g.reshape(groups, -1, v),
                                  h.reshape(groups, -1, d).astype(dtype), preferred_element_type=jnp.float32)
            return constrain(dw + dw_chunk, ("batch", "vocab", None)), nll, dh

        skip = lambda: (dw, zeros_nll, jnp.zeros((b, positions, d), jnp.float32))  # noqa: E731
        dw, nll, dh = jax.lax.cond(jnp.any(m), compute, skip)
        return dw, (nll, dh)

    if with_grad:
        dw0 = constrain(jnp.zeros((groups, v, d), jnp.float32), ("batch", "vocab", None))
        dw, (nll, dh) = jax.lax.scan(with_gradient, dw0, xs)
        dw = dw.sum(axis=0)
    else:
        _, nll = jax.lax.scan(forward, None, xs)
    inverse = jnp.argsort(order, axis=1)
    nll = jnp.where(live, _from_chunks(nll, inverse), 0.0)
    total = jnp.sum(weights * nll)
    if not with_grad:
        return total, nll
    return total, nll, _from_chunks(dh, inverse), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused_nll(hidden, lm_head, targets, live, weights, positions, dtype):
    """(sum over tokens of weights * nll, nll (b, l) where ``live`` else 0)."""
    return _scan_chunks(hidden, lm_head, targets, live, weights, positions, dtype, with_grad=False)


def _fused_nll_fwd(hidden, lm_head, targets, live, weights, positions, dtype):
    total, nll, dh, dw = _scan_chunks(hidden, lm_head, targets, live, weights, positions, dtype,
                                      with_grad=True)
    return (total, nll), (dh.astype(hidden.dtype), dw.astype(lm_head.dtype))


def _fused_nll_bwd(positions, dtype, residuals, cotangents):
    """Only the total is differentiated (``lm_loss`` stops the gradient of the per-token NLL)."""
    del positions, dtype
    dh, dw = residuals
    ct_total, _ = cotangents
    return (ct_total * dh).astype(dh.dtype), (ct_total * dw).astype(dw.dtype), None, None, None


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)
