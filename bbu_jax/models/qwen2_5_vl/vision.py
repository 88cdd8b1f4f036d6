"""Qwen2.5-VL vision tower on fixed-size, host-prepared patch rows.

Input patches are already in window order (``host.vision_layout``), so the tower needs no gather:
window blocks and full-attention blocks differ only in which segment ids (``patch_window_ids`` or
``patch_image_ids``) mask the attention, selected per layer (``lax.cond``) inside one ``nnx.scan``;
window layers only score keys within one window's reach of each query block. The merger
groups 4 consecutive rows (one 2x2 merge block); its output stays in window order and the composed
model gathers it into the text with ``vision_token_index``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int, Shaped

from bbu_jax.models.attention import attention
from bbu_jax.models.layers import Dense, GatedMLP, RMSNorm, apply_rope, layer_loop, remat_policy, stacked
from bbu_jax.models.qwen2_5_vl.config import VisionConfig
from bbu_jax.models.qwen2_5_vl.processing import NORMALIZED

VISION_NORM_EPS = 1e-6  # hard-coded in transformers' vision blocks and merger


def vision_cos_sin(patch_pos: Int[Array, "b p 2"], *, head_dim: int, theta: float):
    """2D RoPE tables (B, P, head_dim) f32: [row freqs, col freqs] twice (rotate_half layout)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = patch_pos.astype(jnp.float32)[..., None] * inv_freq  # (b, p, 2, spatial/2)
    freqs = freqs.reshape(*freqs.shape[:2], -1)  # [row freqs, col freqs]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def patch_rows(patches: Shaped[Array, "b p c"], cfg: VisionConfig) -> Float[Array, "b p d"]:
    """The patch embedding's input rows (B, P, patch_dim) f32. uint8 pixels of one frame (the
    batch's patches) go through the HF processor's normalization table, the frame repeated over
    the temporal axis: exactly the processor's float rows. Float rows pass through unchanged."""
    if patches.dtype != jnp.uint8:
        if patches.shape[-1] != cfg.patch_dim:
            raise ValueError(f"float patch rows have {patches.shape[-1]} values, expected {cfg.patch_dim}")
        return patches
    area = cfg.patch_size**2
    if patches.shape[-1] != cfg.in_channels * area or cfg.in_channels != NORMALIZED.shape[0]:
        raise ValueError(f"uint8 patches have {patches.shape[-1]} values, expected {cfg.in_channels} x {area} "
                         f"({NORMALIZED.shape[0]}-channel images)")
    b, p = patches.shape[:2]
    pixels = patches.reshape(b, p, cfg.in_channels, 1, area).astype(jnp.int32)
    rows = jnp.asarray(NORMALIZED)[jnp.arange(cfg.in_channels)[:, None, None], pixels]
    return jnp.broadcast_to(rows, (b, p, cfg.in_channels, cfg.temporal_patch_size, area)).reshape(b, p, -1)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, compute_dtype, param_dtype, implementation):
        kw = dict(rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype, use_bias=True)
        self.qkv = Dense(cfg.hidden_size, 3 * cfg.hidden_size, axes=("embed", "heads"), **kw)
        self.proj = Dense(cfg.hidden_size, cfg.hidden_size, axes=("heads", "embed"), **kw)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.window_patches = (cfg.window_size // cfg.patch_size) ** 2  # 8 x 8 patches (4 x 4 merged)
        self.implementation = implementation

    def __call__(self, x, cos, sin, window_ids, image_ids, is_full):
        """Attention within each image (``is_full``) or each window: a window is a contiguous run
        of at most ``window_patches`` rows, which lets the kernel skip the keys outside it."""
        b, p, _ = x.shape
        qkv = checkpoint_name(self.qkv(x), "qkv_proj")  # named for the remat policies (layers.SAVED_NAMES)
        q, k, v = jnp.moveaxis(qkv.reshape(b, p, 3, self.num_heads, self.head_dim), 2, 0)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        def attend(segment_ids, local_window):
            return attention(q, k, v, segment_ids, segment_ids, causal=False, implementation=self.implementation,
                             local_window=local_window)

        out = jax.lax.cond(is_full, lambda: attend(image_ids, None),
                           lambda: attend(window_ids, self.window_patches))
        return checkpoint_name(self.proj(out.reshape(b, p, -1)), "out_proj")


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, compute_dtype=jnp.float32, param_dtype=jnp.float32,
                 implementation="xla"):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype,
                                    implementation=implementation)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, use_bias=True,
                            rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, window_ids, image_ids, is_full):
        x = x + self.attn(self.norm1(x), cos, sin, window_ids, image_ids, is_full).astype(jnp.float32)
        return x + self.mlp(self.norm2(x)).astype(jnp.float32)


class PatchMerger(nnx.Module):
    """RMSNorm per patch, concatenate each 2x2 group, Linear - GELU(exact) - Linear."""

    def __init__(self, cfg: VisionConfig, out_dim: int, *, rngs, compute_dtype=jnp.float32,
                 param_dtype=jnp.float32):
        hidden = cfg.hidden_size * cfg.spatial_merge_size**2
        kw = dict(rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype, use_bias=True)
        self.ln_q = RMSNorm(cfg.hidden_size, eps=VISION_NORM_EPS, param_dtype=param_dtype)
        self.mlp_0 = Dense(hidden, hidden, axes=("embed", "mlp"), **kw)
        self.mlp_2 = Dense(hidden, out_dim, axes=("mlp", "embed"), **kw)
        self.unit = cfg.spatial_merge_size**2

    def __call__(self, x: Float[Array, "b p d"]) -> Float[Array, "b m o"]:
        b, p, d = x.shape
        x = self.ln_q(x).reshape(b, p // self.unit, self.unit * d)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x).astype(jnp.float32), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, out_dim: int, *, rngs: nnx.Rngs, compute_dtype=jnp.float32,
                 param_dtype=jnp.float32, implementation: str = "xla", remat: str = "none",
                 scan_layers: bool = True):
        self.cfg = cfg
        self.scan_layers = scan_layers
        self.patch_embed = Dense(cfg.patch_dim, cfg.hidden_size, use_bias=False, axes=(None, "embed"),
                                 rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype)
        self.blocks = stacked(lambda r: VisionBlock(cfg, rngs=r, compute_dtype=compute_dtype,
                                                    param_dtype=param_dtype, implementation=implementation),
                              cfg.depth, rngs)
        self.merger = PatchMerger(cfg, out_dim, rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype)
        bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside 0..{cfg.depth - 1}")
        self.remat = remat
        remat_policy(remat)

    def __call__(self, patches: Shaped[Array, "b p c"], patch_pos: Int[Array, "b p 2"],
                 window_ids: Int[Array, "b p"], image_ids: Int[Array, "b p"]) -> Float[Array, "b m o"]:
        """Window-ordered patches (uint8 pixels or float rows, see ``patch_rows``) -> window-ordered
        merged tokens (B, P/4, out_dim); padded rows (ids 0) produce finite garbage that nothing reads."""
        unit = self.cfg.spatial_merge_size**2
        if patches.shape[1] % unit:
            raise ValueError(f"patch budget {patches.shape[1]} is not a multiple of {unit}")
        x = self.patch_embed(patch_rows(patches, self.cfg)).astype(jnp.float32)
        cos, sin = vision_cos_sin(patch_pos, head_dim=self.cfg.head_dim, theta=self.cfg.rope_theta)
        full = np.zeros(self.cfg.depth, bool)
        full[list(self.cfg.fullatt_block_indexes)] = True

        def body(x, block, is_full):
            return block(x, cos, sin, window_ids, image_ids, is_full)

        if self.remat != "none":
            body = nnx.remat(body, policy=remat_policy(self.remat))
        x = layer_loop(body, scan=self.scan_layers, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)(
            x, self.blocks, jnp.asarray(full))
        return self.merger(x).astype(jnp.float32)
