"""A bare language-model train step of the real model: what tests/test_flash_attention.py lowers
for CUDA at the 3B shape to check the Triton kernels' lowering, free of the product step's
detection head, host-callback matcher, NaN guard and mesh (which that CPU-only lowering cannot
take). Measurements use the product's step (``perf.lowering``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bbu_jax.data.batch import MODEL_INPUTS
from bbu_jax.losses import lm_loss


def lm_train_step(graphdef, rest, tx: optax.GradientTransformation, *, lm_chunk: int):
    """(params, opt_state, batch) -> (params, opt_state, loss): forward, language loss (mean over
    supervised tokens, the fused chunked ``lm_loss``), backward, optimizer update. jit it with the
    first two arguments donated."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params, rest)
        hidden = model(**{k: batch[k] for k in MODEL_INPUTS})
        count = jnp.sum(batch["target_kind"] > 0, dtype=jnp.float32)
        return lm_loss(hidden, model.lm_head_matrix(), batch["targets"], batch["target_kind"], chunk=lm_chunk,
                       scale=1.0 / jnp.maximum(count, 1.0), compute_dtype=model.compute_dtype)[0]

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step
