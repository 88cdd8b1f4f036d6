"""Layers shared by the Qwen2.5-VL vision tower and text decoder.

Parameters are float32 and carry logical axis names (``out_sharding`` metadata) that
``bbu_jax.foundation.sharding`` maps onto the mesh; matmuls run in ``compute_dtype`` with f32
accumulation, norms and rotary embeddings in f32. Layers are created stacked (``stacked``) and run
with ``layer_loop`` so compile time does not grow with depth.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float

from bbu_jax.foundation.sharding import constrain, gathered_weight

Axes = tuple[str | None, ...]
LAYERS_AXIS = "layers"

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A Param annotated with logical axis names. Eager sharding is off: names are resolved to mesh
    axes only by ``bbu_jax.foundation.sharding`` (so the model builds with or without a mesh)."""
    with nnx.use_eager_sharding(False):
        return nnx.Param(value, out_sharding=axes)


def layer_loop(body, *, scan: bool, in_axes, out_axes):
    """``nnx.scan`` over stacked layers. ``scan=False`` unrolls it: compile time grows with depth,
    but the backward pass does not stack every layer's residuals into zero-filled buffers
    (a share of a small model's CPU step worth saving); the params stay stacked either way."""
    return nnx.scan(body, in_axes=in_axes, out_axes=out_axes, unroll=1 if scan else True)


# The matmul outputs a block names with ``checkpoint_name`` (MaxText's names), and the remat policies
# that keep them for the backward pass: a kept output costs its activation memory per layer and
# spares recomputing that product. What stays unnamed is recomputed under every policy but "none":
# the attention scores (the backward needs them or the kernel's own residuals anyway) and down_proj,
# whose output only feeds the residual stream (the next layer's saved input).
_QKV = ("query_proj", "key_proj", "value_proj", "qkv_proj")  # qkv_proj: the vision tower's fused one
SAVED_NAMES: dict[str, tuple[str, ...]] = {
    "save_qkv_proj": _QKV,
    "save_qkv_attn": (*_QKV, "out_proj"),  # + the attention block's output (after o_proj)
    "save_matmuls": (*_QKV, "out_proj", "mlp_gate", "mlp_up"),
}


def remat_policy(name: str):
    """``"none"`` (no remat), ``"full"`` (save only each layer's input), a ``SAVED_NAMES`` policy
    or a ``jax.checkpoint_policies`` name. ``"auto"`` is chosen per compiled train step from its
    memory estimate (the training workflow sets the choice on the model it traces); a model traced
    without that choice remats fully, the policy that fits wherever any does."""
    if name in ("none", "full", "auto"):
        return None
    if name in SAVED_NAMES:
        return jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES[name])
    if not hasattr(jax.checkpoint_policies, name):
        raise ValueError(f"unknown remat policy {name!r}: 'auto', 'none', 'full', one of {sorted(SAVED_NAMES)} "
                         f"or a jax.checkpoint_policies name")
    return getattr(jax.checkpoint_policies, name)


def _times_transposed(x, w, dtype):
    """x @ w.T, accumulated in f32, output in ``dtype``."""
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=dtype)


@jax.custom_vjp
def narrow_product(x: Float[Array, "n din"], w: Float[Array, "dout din"]) -> Float[Array, "n dout"]:
    """x @ w.T for a compute dtype narrower than f32 (accumulated in f32 by the GEMM, output in it).

    With an f32 output the gradient reached the backward's products in f32, so both ran on f32
    operands (on a GPU: at half the bf16 rate at best, twice the bytes); with a plain narrow
    output, dw came out narrow too and its partial sums were reduced across devices in it. Here
    dx's product runs in the compute dtype and dw's leaves its product in f32 (reduced in f32)."""
    return _times_transposed(x, w, x.dtype)


def _narrow_product_fwd(x, w):
    return narrow_product(x, w), (x, w)


def _narrow_product_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.dot(g, w, preferred_element_type=x.dtype)
    return dx, jnp.dot(g.T, x, preferred_element_type=jnp.float32).astype(w.dtype)


narrow_product.defvjp(_narrow_product_fwd, _narrow_product_bwd)


class Dense(nnx.Module):
    """y = x @ weight.T (+ bias); ``weight`` is (out, in), torch's Linear layout, so HF weights load
    and export as a cast, with no transpose (the products read either layout at the same speed).
    ``axes`` name (in, out), the order of ``din``, ``dout``."""

    def __init__(self, din: int, dout: int, *, use_bias: bool, axes: Axes, rngs: nnx.Rngs,
                 compute_dtype=jnp.float32, param_dtype=jnp.float32):
        init = jax.nn.initializers.normal(0.02)
        self.weight_axes = tuple(axes[::-1])
        self.weight = param(init(rngs.params(), (dout, din), param_dtype), self.weight_axes)
        self.bias = param(jnp.zeros((dout,), param_dtype), axes[1:]) if use_bias else None
        self.compute_dtype = compute_dtype
        # Activations are split over tokens (and over heads / mlp units under tensor parallelism),
        # never over the model width: left to itself, GSPMD follows an fsdp-split weight and splits
        # activations by width, then all-reduces whole (tokens x features) products.
        self.activation_axes = tuple(None if a == "embed" else a for a in axes)

    def __call__(self, x: Float[Array, "... din"]) -> Float[Array, "... dout"]:
        # As a 2D product: the weight's gradient then contracts one token axis, which XLA's CPU dot
        # reads in place; contracting (batch, length) made it write a transposed copy of dy first.
        lead = x.shape[:-1]
        x = constrain(x.reshape(-1, x.shape[-1]), ("batch", self.activation_axes[0]))
        weight = gathered_weight(self.weight[...], self.weight_axes, self.activation_axes[::-1], self.compute_dtype)
        x = x.astype(self.compute_dtype)
        if jnp.dtype(self.compute_dtype) == jnp.float32:  # nothing to narrow: plain autodiff
            y = _times_transposed(x, weight, jnp.float32)
        else:
            y = narrow_product(x, weight)
        y = constrain(y, ("batch", self.activation_axes[1])).reshape(*lead, y.shape[-1])
        if self.bias is not None:
            y = y.astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.compute_dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.weight = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.weight[...].astype(jnp.float32)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)); with bias in the vision tower, without in the decoder."""

    def __init__(self, dim: int, hidden: int, *, act: str, use_bias: bool, rngs: nnx.Rngs,
                 compute_dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(use_bias=use_bias, rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype)
        self.gate_proj = Dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(hidden, dim, axes=("mlp", "embed"), **kw)
        self.act = act

    def __call__(self, x):
        gate = checkpoint_name(self.gate_proj(x), "mlp_gate")
        up = checkpoint_name(self.up_proj(x), "mlp_up")
        return self.down_proj(activation(self.act)(gate) * up)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Float[Array, "b l h d"], cos: Float[Array, "b l d"], sin: Float[Array, "b l d"]):
    """Rotary embedding in f32 (rotate_half convention), result in x's dtype."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None] + rotate_half(x32) * sin[:, :, None]
    return out.astype(x.dtype)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n copies of a module with every param stacked on a leading "layers" axis."""
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def create(r):
        return make(r)
    return create(rngs)
