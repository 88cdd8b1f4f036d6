"""The jitted train step: exact token-weighted accumulation, NaN guard, group norms.

A task provides two functions (see task.py for the real one, tests for toy ones):

  count_fn(batch) -> {name: count}       units each loss term is averaged over (supervised
                                         tokens, GT boxes, ...); depends on the batch only.
  loss_fn(params, batch, counts, rng) -> (total, metrics)
                                         total = sum_k w_k * sum_k / counts[k], i.e. already
                                         divided by the counts of the WHOLE optimizer step;
                                         metrics = {name: (sum, count)} for logging.

The step receives A micro-batches stacked on a leading axis (A = grad_accum_steps). Counts are
summed over all of them first, so summing per-micro-batch gradients gives exactly the gradient
of the loss of the whole step (same for devices: the global batch is one jitted computation).

The NaN guard: a step whose loss or gradient is non-finite keeps the old state (only the step
counter moves); one whose new parameters would be non-finite keeps the old parameters, its Adam
moments (finite) move on. Checking the result and not only its inputs matters: a finite gradient
times an overflowing learning rate gives inf weights. So the state, and every checkpoint of it,
only ever holds finite values.

Groups at lr 0 for the whole run are not differentiated at all (``frozen``): a frozen vision tower
costs its forward pass only.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bbu_jax.training.optimizer import group_norms
from bbu_jax.foundation.sharding import mesh_context
from bbu_jax.training.train_state import State

Metrics = dict[str, tuple[jax.Array, jax.Array]]
CountFn = Callable[[dict], dict[str, jax.Array]]
LossFn = Callable[[Any, dict, dict, jax.Array], tuple[jax.Array, Metrics]]

BATCH_AXES = ("data", "fsdp")  # the rows of a batch are split over both axes


def accumulated_batch_sharding(mesh: Mesh) -> NamedSharding:
    """(A, B, ...) arrays: micro-batch axis replicated, rows split over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def total_counts(count_fn: CountFn, batch: dict) -> dict[str, jax.Array]:
    """Counts of the whole step (all micro-batches), at least 1 so empty terms give 0 not NaN."""
    counts = jax.vmap(count_fn)(batch)
    return {k: jnp.maximum(jnp.sum(v, axis=0), 1).astype(jnp.float32) for k, v in counts.items()}


def _scan_micro(fn, batch):
    """Sum fn(micro_batch) over the leading micro-batch axis (scan: one compiled body)."""
    first = jax.tree_util.tree_map(lambda x: x[0], batch)
    out0 = fn(first)
    if jax.tree_util.tree_leaves(batch)[0].shape[0] == 1:
        return out0
    rest = jax.tree_util.tree_map(lambda x: x[1:], batch)

    def body(carry, micro):
        return jax.tree_util.tree_map(jnp.add, carry, fn(micro)), None

    return jax.lax.scan(body, out0, rest)[0]


def all_finite(tree) -> jax.Array:
    """True when no floating leaf of `tree` holds a NaN or an inf (exact: no sum that could overflow)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def _take(tree, positions: list[int]) -> list:
    leaves = jax.tree_util.tree_leaves(tree)
    return [leaves[i] for i in positions]


def _put(tree, positions: list[int], values: list):
    """tree with its leaves at ``positions`` (flat order) replaced by ``values``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    for i, v in zip(positions, values):
        leaves[i] = v
    return jax.tree_util.tree_unflatten(treedef, leaves)


def train_step(state: State, batch: dict, *, loss_fn: LossFn, count_fn: CountFn,
               tx: optax.GradientTransformation, labels, frozen: frozenset[str] = frozenset()
               ) -> tuple[State, dict[str, Metrics | jax.Array]]:
    """One optimizer step. ``frozen``: groups at lr 0 for the whole run (optimizer.frozen_groups).
    The loss is differentiated w.r.t. the other leaves only and the frozen ones enter it as
    constants, so their backward pass (weight gradients, activations kept for them, a frozen vision
    tower's whole backward) is never built; the optimizer gets zeros there (its frozen groups
    ignore them) and they have no gn/ metric."""
    counts = total_counts(count_fn, batch)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    params = state["params"]
    live = [i for i, g in enumerate(jax.tree_util.tree_leaves(labels)) if g not in frozen]
    grad_fn = jax.value_and_grad(lambda t, mb: loss_fn(_put(params, live, t), mb, counts, rng), has_aux=True)

    def micro(mb):
        (loss, metrics), grads = grad_fn(_take(params, live), mb)
        return loss, metrics, grads

    loss, metrics, grads = _scan_micro(micro, batch)
    grads_by_group = group_norms(grads, _take(labels, live))
    grad_norm = optax.tree.norm(grads)
    # A finite loss and gradient norm mean finite gradients, and so finite new Adam moments (each is
    # a convex mix of the old moment and g or g**2, and g**2 <= grad_norm**2). The optimizer is told
    # whether to apply the step before it computes it (optimizer.make_optimizer's `apply`), so each
    # new leaf is written over its donated old one: choosing between new and old state afterwards
    # holds both (benchmarks/memory_3b.py).
    grads_ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Non-finite grads must not reach the optimizer's arithmetic either: zero them.
    safe_grads = _put(jax.tree_util.tree_map(jnp.zeros_like, params), live,
                      [jnp.where(grads_ok, g, jnp.zeros_like(g)) for g in grads])
    updates, new_opt = tx.update(safe_grads, state["opt_state"], params, apply=grads_ok)
    # Finite moments can still give non-finite weights (an overflowing learning rate): the check
    # reads params + updates in a fused reduction, so the new params exist once, in place.
    new_params = optax.apply_updates(params, updates)
    ok = grads_ok & all_finite(new_params)
    select = lambda pred, new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(pred, n, o), new, old)  # noqa: E731
    new_state = {
        "step": state["step"] + 1,
        "params": select(ok, new_params, params),
        "opt_state": new_opt,
        "rng": state["rng"],
        "nonfinite_streak": jnp.where(ok, 0, state["nonfinite_streak"] + 1).astype(jnp.int32),
        "skipped": state["skipped"] + (~ok).astype(jnp.int32),
    }
    one = jnp.ones([], jnp.float32)
    okf = ok.astype(jnp.float32)
    # A skipped step contributes nothing to the logged averages (its sums may be NaN).
    out = {k: (jnp.where(ok, s, 0.0).astype(jnp.float32), c.astype(jnp.float32) * okf)
           for k, (s, c) in metrics.items()}
    # Step-level quantities are averaged over the steps of a logging interval.
    out["loss"] = (jnp.where(ok, loss, 0.0).astype(jnp.float32), okf)
    out["grad_norm"] = (jnp.where(ok, grad_norm, 0.0), okf)
    for g, v in grads_by_group.items():
        out[f"gn/{g}"] = (jnp.where(ok, v, 0.0), okf)
    for g, v in group_norms(new_state["params"], labels).items():
        out[f"wn/{g}"] = (v, one)
    out["skipped_steps"] = ((~ok).astype(jnp.float32), one)
    return new_state, {"metrics": out, "ok": ok, "grads_ok": grads_ok,
                       "nonfinite_streak": new_state["nonfinite_streak"]}


def jit_train_step(*, loss_fn: LossFn, count_fn: CountFn, tx: optax.GradientTransformation,
                   labels, state_shardings: State, mesh: Mesh, frozen: frozenset[str] = frozenset()):
    """train_step compiled with explicit in/out shardings; the input state is donated."""
    replicated = NamedSharding(mesh, P())

    def fn(state, batch):
        with mesh_context(mesh):
            return train_step(state, batch, loss_fn=loss_fn, count_fn=count_fn, tx=tx, labels=labels,
                              frozen=frozen)

    return jax.jit(fn, in_shardings=(state_shardings, accumulated_batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
