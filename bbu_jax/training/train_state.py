"""The train state as one plain pytree (dict) so jit, shardings and orbax all see the same tree.

    {"step": int32[], "params": {"model": ..., "head": ...}, "opt_state": optax state,
     "rng": uint32[2] key data, "nonfinite_streak": int32[], "skipped": int32[]}

params are the NNX `Param` leaves as a pure nested dict; the graph definitions and any non-Param
variables (`rest`) stay outside the state: they are rebuilt from the model config, never trained.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bbu_jax.training.optimizer import path_str

State = dict[str, Any]


def split_modules(modules: dict[str, nnx.Module]):
    """NNX modules -> (graphdefs, params as a pure dict keyed like modules, non-Param state)."""
    graphdefs, params, rest = {}, {}, {}
    for name, module in modules.items():
        graphdefs[name], p, rest[name] = nnx.split(module, nnx.Param, ...)
        params[name] = nnx.to_pure_dict(p)
    return graphdefs, params, rest


def merge_modules(graphdefs, params, rest) -> dict[str, nnx.Module]:
    """Inverse of split_modules; called inside jitted functions (trace-time only)."""
    return {name: nnx.merge(graphdefs[name], params[name], rest[name]) for name in graphdefs}


def init_state(params, tx: optax.GradientTransformation, seed: int) -> State:
    return {
        "step": jnp.zeros([], jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "nonfinite_streak": jnp.zeros([], jnp.int32),
        "skipped": jnp.zeros([], jnp.int32),
    }


def _names(key_path) -> tuple[str, ...]:
    return tuple(path_str([k]) for k in key_path)


def state_shardings(abstract_state: State, param_shardings, mesh: Mesh) -> State:
    """Shardings for the whole state: params as given; each optimizer-state leaf that mirrors a
    parameter (Adam moments: same trailing path and shape) like that parameter; scalars replicated."""
    replicated = NamedSharding(mesh, P())
    by_path = {}
    for (kp, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(abstract_state["params"]),
                              jax.tree_util.tree_leaves(param_shardings)):
        by_path[_names(kp)] = (leaf.shape, sh)

    def opt_leaf(kp, leaf):
        names = _names(kp)
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    out = {k: replicated for k in abstract_state if k not in ("params", "opt_state")}
    out["params"] = param_shardings
    out["opt_state"] = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"])
    return out


def create_state(params, tx: optax.GradientTransformation, seed: int, shardings: State) -> State:
    """Initial state placed on its shardings."""
    return jax.jit(init_state, static_argnums=(1, 2), out_shardings=shardings)(params, tx, seed)


def abstract_state(abstract_params, tx: optax.GradientTransformation, seed: int) -> State:
    return jax.eval_shape(lambda p: init_state(p, tx, seed), abstract_params)


def with_shardings(abstract: State, shardings: State) -> State:
    """ShapeDtypeStructs carrying their target sharding (for sharded checkpoint restore)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
