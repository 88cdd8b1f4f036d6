"""Hungarian matching of predicted queries to padded ground-truth columns, usable inside jit.

Two back ends with one contract: ``"scipy"`` runs scipy's linear_sum_assignment on the host
through ``jax.pure_callback``; ``"optax"`` runs ``optax.assignment.hungarian_algorithm`` on the
device. A config says ``"auto"`` (`resolve_matcher`): on an accelerator the callback would stop
the device every step for a copy of the costs to the host, the solve and a copy back, so the
matching stays on the device; on the CPU the host is the device, and scipy's solver is the faster
one per problem. The cost is stop-gradient'ed: the assignment is a constant of the loss, as in DETR.

Padded GT columns get one constant cost (above every valid cost) within a problem: with Q >= M that
constant adds the same amount to every assignment, so it cannot change which queries the valid
columns get; with Q < M it makes the padded columns the ones left unmatched.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int
from scipy.optimize import linear_sum_assignment

METHODS = ("scipy", "optax")
MATCHERS = ("auto",) + METHODS  # what a config may name


def resolve_matcher(name: str, platform: str) -> str:
    """The method ``name`` stands for on ``platform`` (a jax backend name, ``jax.default_backend()``):
    "auto" is "scipy" on the CPU and "optax" on any accelerator; a method's name stands for itself."""
    if name not in MATCHERS:
        raise ValueError(f"unknown matcher {name!r}; expected one of {MATCHERS}")
    if name != "auto":
        return name
    return "scipy" if platform == "cpu" else "optax"


def _prepare_cost(cost: Float[Array, "b q m"], gt_valid: Bool[Array, "b m"]) -> Float[Array, "b q m"]:
    """Finite float32 cost with padded columns set to (max valid cost + 1) per problem."""
    cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
    valid = jnp.broadcast_to(gt_valid[:, None, :], cost.shape)
    finite = jnp.isfinite(cost)
    big = jnp.max(jnp.where(valid & finite, cost, -jnp.inf), axis=(1, 2), keepdims=True)
    big = jnp.where(jnp.isfinite(big), big, 0.0)
    low = jnp.min(jnp.where(valid & finite, cost, jnp.inf), axis=(1, 2), keepdims=True)
    low = jnp.where(jnp.isfinite(low), low, 0.0)
    pad = big + 1.0 + (big - low)  # strictly above any valid cost, on the scale of the problem
    cost = jnp.where(finite, cost, big + 1.0)  # NaN/inf predictions must not crash the solver
    return jnp.where(valid, cost, pad)


def _scipy_match_host(cost: Array | np.ndarray, gt_valid: Array | np.ndarray) -> np.ndarray:
    """Host side: any leading dims (vmap adds them), trailing (Q, M) problems. pure_callback hands
    over host-resident jax Arrays, read here as numpy."""
    lead, (q, m) = cost.shape[:-2], cost.shape[-2:]
    cost = np.asarray(cost).reshape(-1, q, m)
    valid = np.broadcast_to(np.asarray(gt_valid), lead + (m,)).reshape(-1, m)
    out = np.full((cost.shape[0], m), -1, np.int32)
    for k in range(cost.shape[0]):
        rows, cols = linear_sum_assignment(cost[k])
        out[k, cols] = rows
    out[~valid] = -1
    return out.reshape(lead + (m,))


def _optax_match_one(cost: Float[Array, "q m"]) -> Int[Array, " m"]:
    rows, cols = optax.assignment.hungarian_algorithm(cost)
    return jnp.full(cost.shape[1], -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))


def hungarian_match(cost: Float[Array, "b q m"], gt_valid: Bool[Array, "b m"], *,
                    method: str = "scipy") -> Int[Array, "b m"]:
    """Query index matched to each GT column; -1 for padded columns (and for valid columns left
    over when there are more valid GT than queries). Jittable and vmappable; no gradient."""
    if method not in METHODS:
        raise ValueError(f"unknown matcher {method!r}; expected one of {METHODS} (\"auto\" is resolved "
                         f"where the settings are built)")
    gt_valid = gt_valid.astype(bool)
    prepared = _prepare_cost(cost, gt_valid)
    if method == "scipy":
        out_type = jax.ShapeDtypeStruct(gt_valid.shape, jnp.int32)
        match = jax.pure_callback(_scipy_match_host, out_type, prepared, gt_valid,
                                  vmap_method="broadcast_all")
    else:
        match = jax.vmap(_optax_match_one)(prepared)
    return jnp.where(gt_valid, match, -1)
