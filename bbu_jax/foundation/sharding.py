"""One device mesh (data, fsdp, tensor) and ONE table mapping logical axis names to mesh axes.

Params carry logical names in their NNX ``out_sharding`` metadata (set where they are created,
e.g. ``("embed", "mlp")``; stacked layers get a leading ``"layers"``). This module resolves those
names through ``LOGICAL_AXIS_RULES`` (MaxText style), so changing a parallelism strategy is one edit
here. A mesh axis that does not divide a dimension is dropped for that dimension (replicated),
so tiny test models shard on any mesh.

Activations get the same names through ``constrain`` inside code traced under ``mesh_context``
(the jitted train and eval steps): left alone, GSPMD follows fsdp-split kernels and splits
activations by width (``benchmarks/collectives.py`` measures what a step sends). Weights reach
their products through ``gathered_weight``: cast on their shard, gathered once per use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis / axes (None: replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("length", None),
)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """The device mesh's shape (``make_mesh(data, fsdp, tensor)``) and, for a run over several
    processes, what ``jax.distributed.initialize`` needs before any device is touched."""
    data: int
    fsdp: int
    tensor: int
    distributed: bool
    coordinator_address: str
    num_processes: int
    process_id: int


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh of shape (data, fsdp, tensor) over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh {data}x{fsdp}x{tensor} needs {data * fsdp * tensor} devices, "
                         f"{len(devices)} given")
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh,
                    rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions have these logical names."""
    table = dict(rules)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for axis in targets:
            size = mesh.shape[axis]
            if axis not in used and dim % (size * int(np.prod([mesh.shape[a] for a in kept]))) == 0:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names, for code traced under ``mesh_context``
    (the jitted train and eval steps); ``x`` unchanged when traced without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def gathered_weight(w: jax.Array, axes: tuple[str | None, ...], compute_axes: tuple[str | None, ...],
                    dtype) -> jax.Array:
    """``w`` in the compute ``dtype``, laid out as ``compute_axes`` (e.g. the fsdp split of
    "embed" dropped, the tensor split kept), for a product inside a step traced under a mesh.

    Cast before the gather, so FSDP moves compute-dtype bytes, and one value for the forward, the
    rematerialized forward and the backward's products: left to GSPMD, the backward gathered the
    f32 weight again for dx = dy w^T. The gradient comes back in w's dtype, reduced and split as
    ``axes``. Without a mesh this is ``w.astype(dtype)``."""
    if jax.sharding.get_abstract_mesh().empty:
        return w.astype(dtype)
    return _gathered_weight(w, tuple(axes), tuple(compute_axes), np.dtype(dtype), w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _gathered_weight(w, axes, compute_axes, dtype, w_dtype):
    # cast where w lies (its own split), then lay it out for the product
    return constrain(constrain(w.astype(dtype), axes), compute_axes)


def _gathered_weight_fwd(w, axes, compute_axes, dtype, w_dtype):
    return _gathered_weight(w, axes, compute_axes, dtype, w_dtype), None


def _gathered_weight_bwd(axes, compute_axes, dtype, w_dtype, _, ct):
    return (constrain(ct.astype(w_dtype), axes),)


_gathered_weight.defvjp(_gathered_weight_fwd, _gathered_weight_bwd)


def shards(axis: str, dim: int) -> int:
    """Into how many pieces a dimension of size ``dim`` named ``axis`` is split under the current
    mesh (1 without one), e.g. the row groups whose partial sums stay on their own devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    spec = logical_to_spec((axis,), (dim,), mesh)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in names]))


def mesh_context(mesh: Mesh | None):
    """Context for tracing a step: ``constrain`` and ``shards`` see this mesh (none: no change)."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def param_shardings(model_or_state, mesh: Mesh):
    """NamedSharding per Variable (same tree as ``nnx.state(model)``), from its logical names."""
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state

    def one(v):
        axes = v.get_metadata().get("out_sharding") or (None,) * len(v.shape)
        return v.replace(NamedSharding(mesh, logical_to_spec(axes, v.shape, mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

