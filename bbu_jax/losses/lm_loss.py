"""Next-token cross-entropy in chunks of tokens, never materializing (tokens x vocab) logits.

Qwen's vocabulary has 151,936 ids: float32 logits for an 8k-token row would be ~5 GB, plus the same
again for their gradient. Here ``lax.map`` walks chunks of tokens; each chunk's logits are built,
reduced to a per-token NLL and dropped, and ``jax.checkpoint`` makes the backward pass rebuild them
chunk by chunk instead of keeping them. Peak memory is one (chunk x vocab) block.

Targets follow ``bbu_jax.data.batch``: ``targets[t]`` is the token predicted at position t and
``target_kind`` is 0 (unsupervised), 1 (teacher answer) or 2 (student answer).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

TEACHER, STUDENT = 1, 2


def token_nll(hidden: Float[Array, "n d"], lm_head: Float[Array, "v d"], targets: Int[Array, " n"],
              *, chunk: int) -> Float[Array, " n"]:
    """Per-token negative log-likelihood, float32, computed chunk by chunk."""
    n, d = hidden.shape
    vocab = lm_head.shape[0]
    chunk = min(chunk, n)
    pad = (-n) % chunk
    hidden = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    targets = jnp.pad(jnp.clip(targets, 0, vocab - 1), (0, pad)).reshape(-1, chunk)

    @jax.checkpoint
    def chunk_nll(h, t, w):
        logits = jnp.einsum("cd,vd->cv", h, w, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    nll = jax.lax.map(lambda xs: chunk_nll(xs[0], xs[1], lm_head), (hidden, targets))
    return nll.reshape(-1)[:n]


def lm_loss_sums(hidden: Float[Array, "b l d"], lm_head: Float[Array, "v d"],
                 targets: Int[Array, "b l"], target_kind: Int[Array, "b l"], *, chunk: int
                 ) -> dict[str, tuple[Array, Array]]:
    """{name: (NLL sum, token count)} for lm (all supervised), teacher_lm and student_lm."""
    b, l, d = hidden.shape
    nll = token_nll(hidden.reshape(b * l, d), lm_head, targets.reshape(-1), chunk=chunk)
    kind = target_kind.reshape(-1)

    def masked(mask):
        return jnp.where(mask, nll, 0.0).sum(), mask.sum().astype(jnp.float32)

    return {"lm_loss": masked(kind > 0), "teacher_lm_loss": masked(kind == TEACHER),
            "student_lm_loss": masked(kind == STUDENT)}
