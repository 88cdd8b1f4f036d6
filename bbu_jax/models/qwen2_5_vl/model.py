"""The composed Qwen2.5-VL: vision tower -> merged tokens placed at `<|image_pad|>` -> decoder.

The jitted call sees only fixed-shape, host-prepared arrays (``bbu_jax.data.batch`` fields), so
image sizes never recompile. It returns the final-norm hidden states; ``logits`` applies the
(tied or untied) lm_head, so losses can chunk the vocabulary projection themselves.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int, Shaped

from bbu_jax.models.layers import param, remat_policy
from bbu_jax.models.qwen2_5_vl import processing
from bbu_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from bbu_jax.models.qwen2_5_vl.text import KVCache, TextModel
from bbu_jax.models.qwen2_5_vl.vision import VisionTower


class Qwen25VL(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs, compute_dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl: str = "xla", remat: str = "none",
                 scan_layers: bool = True):
        self.config = config
        self.compute_dtype = compute_dtype
        kw = dict(rngs=rngs, compute_dtype=compute_dtype, param_dtype=param_dtype,
                  implementation=attention_impl, remat=remat, scan_layers=scan_layers)
        self.visual = VisionTower(config.vision, config.text.hidden_size, **kw)
        self.language_model = TextModel(config.text, **kw)
        shape = (config.text.vocab_size, config.text.hidden_size)
        self.lm_head = None if config.tie_word_embeddings else param(
            jax.nn.initializers.normal(0.02)(rngs.params(), shape, param_dtype), ("vocab", "embed"))

    def __call__(self, input_ids: Int[Array, "b l"], positions: Int[Array, "b 3 l"],
                 segment_ids: Int[Array, "b l"], patches: Shaped[Array, "b p c"] | None = None,
                 patch_pos: Int[Array, "b p 2"] | None = None, patch_window_ids: Int[Array, "b p"] | None = None,
                 patch_image_ids: Int[Array, "b p"] | None = None,
                 vision_token_index: Int[Array, "b l"] | None = None) -> Float[Array, "b l d"]:
        """Final-norm hidden states (B, L, D) f32. Without patches the batch is text only."""
        x = self.embed(input_ids, patches, patch_pos, patch_window_ids, patch_image_ids, vision_token_index)
        return self.language_model(x, positions, segment_ids)

    def set_remat(self, policy: str) -> None:
        """The remat policy of both towers (``layers.remat_policy``), read when the model is traced:
        the train step sets the one it compiles for on its per-trace copy (remat_policy "auto")."""
        remat_policy(policy)
        self.visual.remat = self.language_model.remat = policy

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KV cache in the compute dtype: (layers, B, L_max, H_kv, D) keys and values."""
        return self.language_model.init_cache(batch, max_length, self.compute_dtype)

    def prefill(self, input_ids: Int[Array, "b l"], positions: Int[Array, "b 3 l"],
                segment_ids: Int[Array, "b l"], cache: KVCache, kv_segment_ids: Int[Array, "b lmax"],
                patches: Shaped[Array, "b p c"] | None = None, patch_pos: Int[Array, "b p 2"] | None = None,
                patch_window_ids: Int[Array, "b p"] | None = None,
                patch_image_ids: Int[Array, "b p"] | None = None,
                vision_token_index: Int[Array, "b l"] | None = None) -> tuple[Float[Array, "b v"], KVCache]:
        """Run a (left-padded) prompt into cache slots [0, L): logits of its last position + cache."""
        x = self.embed(input_ids, patches, patch_pos, patch_window_ids, patch_image_ids, vision_token_index)
        hidden, cache = self.language_model.with_cache(x, positions, segment_ids, cache, jnp.int32(0),
                                                       kv_segment_ids)
        return self.logits(hidden[:, -1:])[:, 0], cache

    def decode_step(self, token: Int[Array, " b"], position: Int[Array, " b"], cache: KVCache,
                    cache_index: Int[Array, ""], kv_segment_ids: Int[Array, "b lmax"]
                    ) -> tuple[Float[Array, "b v"], KVCache]:
        """One generated token per row at cache slot ``cache_index``; its M-RoPE position is
        ``position`` on all three rows (generated text). Returns next-token logits + cache."""
        positions = jnp.broadcast_to(position[:, None, None], (position.shape[0], 3, 1))
        x = self.language_model.embed_tokens(token[:, None])
        hidden, cache = self.language_model.with_cache(x, positions, jnp.ones_like(token[:, None]), cache,
                                                       cache_index, kv_segment_ids)
        return self.logits(hidden)[:, 0], cache

    def embed(self, input_ids, patches=None, patch_pos=None, patch_window_ids=None, patch_image_ids=None,
              vision_token_index=None) -> Float[Array, "b l d"]:
        """Token embeddings with image-pad positions replaced by merged vision features."""
        x = self.language_model.embed_tokens(input_ids)
        if patches is None:
            return x
        feats = self.visual(patches, patch_pos, patch_window_ids, patch_image_ids)
        return scatter_vision_tokens(x, feats, vision_token_index)

    def embed_table(self) -> Float[Array, "v d"]:
        return self.language_model.embed_tokens.weight[...]

    def lm_head_matrix(self) -> Float[Array, "v d"]:
        return self.embed_table() if self.lm_head is None else self.lm_head[...]

    def logits(self, hidden: Float[Array, "b l d"]) -> Float[Array, "b l v"]:
        w = self.lm_head_matrix().astype(self.compute_dtype)
        return jnp.einsum("bld,vd->blv", hidden.astype(self.compute_dtype), w,
                          preferred_element_type=jnp.float32)


def scatter_vision_tokens(embeds: Float[Array, "b l d"], feats: Float[Array, "b m d"],
                          index: Int[Array, "b l"]) -> Float[Array, "b l d"]:
    """embeds[b, l] <- feats[b, index[b, l]] where index >= 0 (a gather: fixed shapes, no scatter)."""
    gathered = jnp.take_along_axis(feats, jnp.clip(index, 0, feats.shape[1] - 1)[..., None], axis=1)
    return jnp.where((index >= 0)[..., None], gathered.astype(embeds.dtype), embeds)


@nnx.jit
def _forward_logits(model: Qwen25VL, batch: dict[str, jax.Array]) -> jax.Array:
    return model.logits(model(**batch))


def hf_forward(model: Qwen25VL, input_ids, attention_mask=None, pixel_values=None,
               image_grid_thw=None, mm_token_type_ids=None, *, length_bucket: int = 64,
               patch_bucket: int = 256) -> np.ndarray:
    """Logits (B, L, V) float32 numpy from exactly what transformers' processor returns.

    Each row is one segment whose positions start at 0 on its first real token (for text-only
    rows transformers counts from the row start instead; RoPE is relative, so logits agree).
    Padded positions hold logits of a masked query (finite, meaningless). Tokens and patches are
    padded up to multiples of the buckets so that similar inputs share one compilation.
    ``mm_token_type_ids`` (returned by the processor) is implied by the image tokens and unused.
    """
    del mm_token_type_ids
    cfg = model.config
    ids = _np(input_ids)
    grids = None if image_grid_thw is None else _np(image_grid_thw)
    n_patches = 0 if pixel_values is None else _np(pixel_values).shape[0]
    batch = processing.prepare_hf_batch(
        ids, None if attention_mask is None else _np(attention_mask),
        None if pixel_values is None else _np(pixel_values), grids,
        image_token_id=cfg.image_token_id, vision_start_token_id=cfg.vision_start_token_id,
        spatial_merge_size=cfg.vision.spatial_merge_size, window_size=cfg.vision.window_size,
        patch_size=cfg.vision.patch_size, patch_budget=max(1, -(-n_patches // patch_bucket)) * patch_bucket)
    length = ids.shape[1]
    pad = -length % length_bucket
    fill = {"vision_token_index": -1}
    batch = {k: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)], constant_values=fill.get(k, 0))
             if k in ("input_ids", "positions", "segment_ids", "vision_token_index") else v
             for k, v in batch.items()}
    if pixel_values is None:
        batch = {k: batch[k] for k in ("input_ids", "positions", "segment_ids")}
    logits = _forward_logits(model, {k: jnp.asarray(v) for k, v in batch.items()})
    return np.asarray(logits[:, :length])


def _np(x) -> np.ndarray:
    """numpy view of numpy / jax / torch inputs (torch without importing it)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)
