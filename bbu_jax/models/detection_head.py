"""DETR-style detection head on the language model's final hidden states.

Per packed segment the head reads a fixed-size memory gathered from the LLM hidden states by the
host-computed indices of ``bbu_jax.data.batch`` (student image tokens = vision stream, student
prompt tokens = text stream; never answer tokens). Each stream has its own adapter (projection +
LayerNorm) and a stream-type embedding; vision keys also get a 2D sine embedding of the token's
normalized (y, x) position. Q learnable queries run through pre-norm decoder layers (self-attention,
masked cross-attention, MLP). Each query carries a reference box (DAB-DETR's anchor): a learned
anchor for the first layer, then the box the previous layer gave; the query's position term is made
from it (the sine embedding of its centre, the same as the vision keys', and its size), so its
cross-attention looks near its box from the first step on, where DETR's learned positions find
that place only after long training. Every layer refines its reference box (a delta before the
sigmoid) and gives objectness logits, so the loss can add auxiliary terms per layer.

Captions: a small causal decoder whose first input is the (projected) query state -- the final
layer's state plus the vision memory read around the query's own predicted box (``box_read``):
what a part is lies in the tokens where it is, which learned queries reach only slowly through
attention -- and whose token
embeddings and output scores both come from the LLM's embedding table restricted to the caption
vocabulary (sorted LLM ids occurring in the dataset's descs plus ``<|im_end|>``): scoring the full
151,936-id vocabulary for every object would dominate the head's cost. Gradients of the caption
loss reach the shared embedding table through the gather.

Shapes: B rows, S segments, Q queries, NV/NT memory tokens, C caption tokens, K caption vocab,
D the LLM width, W the head width, NL the number of decoder layers.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from bbu_jax.models.attention import attention


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """The head's architecture: what a saved head's config file holds beside the LLM width."""
    width: int
    num_queries: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    caption_layers: int
    max_caption_len: int


def caption_vocab_index(ids: Int[Array, "*b"], caption_vocab: Int[Array, " k"]
                        ) -> tuple[Int[Array, "*b"], Bool[Array, "*b"]]:
    """Caption-vocabulary index of each LLM token id and whether the id is in the vocabulary."""
    idx = jnp.clip(jnp.searchsorted(caption_vocab, ids), 0, caption_vocab.shape[0] - 1)
    return idx.astype(jnp.int32), caption_vocab[idx] == ids


def check_caption_ids(gt_caption_ids: np.ndarray, gt_caption_mask: np.ndarray,
                      caption_vocab: np.ndarray) -> None:
    """Host-side guard: every supervised caption id must be in the (sorted, unique) vocabulary.

    Inside jit an out-of-vocabulary id cannot raise; the loss drops it and counts it in the
    ``caption_oov_tokens`` metric. Call this where the batch or the vocabulary is built.
    """
    vocab = np.asarray(caption_vocab)
    if vocab.ndim != 1 or np.any(np.diff(vocab) <= 0):
        raise ValueError("caption_vocab must be a 1-D strictly increasing array of LLM token ids")
    ids = np.asarray(gt_caption_ids)[np.asarray(gt_caption_mask, bool)]
    missing = np.setdiff1d(ids, vocab)
    if missing.size:
        raise ValueError(f"{missing.size} caption token id(s) not in caption_vocab "
                         f"(first: {missing[:10].tolist()}); rebuild the caption vocabulary")


def sine_position_embedding_2d(pos_yx: Float[Array, "*b 2"], dim: int,
                               temperature: float = 10000.0) -> Float[Array, "*b {dim}"]:
    """DETR's sine embedding of normalized (y, x) in [0, 1]: dim/2 features per coordinate."""
    if dim % 4:
        raise ValueError(f"sine position embedding needs dim divisible by 4, got {dim}")
    half = dim // 2
    freqs = temperature ** (2 * (jnp.arange(half) // 2) / half)
    angles = pos_yx.astype(jnp.float32)[..., None] * (2 * math.pi) / freqs  # (..., 2, half)
    emb = jnp.where(jnp.arange(half) % 2 == 0, jnp.sin(angles), jnp.cos(angles))
    return emb.reshape(*pos_yx.shape[:-1], dim)


class _Attention(nnx.Module):
    """Multi-head attention through the shared entry point (``bbu_jax.models.attention``).

    Visibility is given as key validity (..., Tk) plus ``causal``; any leading dims.
    """

    def __init__(self, width: int, num_heads: int, *, implementation: str, dtype, param_dtype,
                 rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"head width {width} not divisible by num_heads {num_heads}")
        self.num_heads, self.implementation = num_heads, implementation
        lin = partial(nnx.Linear, width, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query, self.key, self.value, self.out = lin(), lin(), lin(), lin()

    def __call__(self, q, k, v, key_valid=None, *, causal: bool = False):
        lead, tq, tk = q.shape[:-2], q.shape[-2], k.shape[-2]
        split = lambda x: x.reshape(-1, x.shape[-2], self.num_heads, x.shape[-1] // self.num_heads)
        q, k, v = split(self.query(q)), split(self.key(k)), split(self.value(v))
        kv_seg = (jnp.ones((q.shape[0], tk), jnp.int32) if key_valid is None
                  else jnp.broadcast_to(key_valid, (*lead, tk)).reshape(-1, tk).astype(jnp.int32))
        out = attention(q, k, v, jnp.ones((q.shape[0], tq), jnp.int32), kv_seg, causal=causal,
                        implementation=self.implementation)
        return self.out(out.reshape(*lead, tq, -1))


class _Block(nnx.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, cross_attention: bool,
                 attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        norm = partial(nnx.LayerNorm, width, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        attn = partial(_Attention, width, num_heads, implementation=attention_impl, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
        self.self_norm, self.self_attn = norm(), attn()
        self.cross_norm = norm() if cross_attention else None
        self.cross_attn = attn() if cross_attention else None
        self.mlp_norm = norm()
        self.mlp_in = nnx.Linear(width, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, pos, *, causal=False, memory=None, memory_pos=None, memory_valid=None):
        h = self.self_norm(x)
        x = x + self.self_attn(h + pos, h + pos, h, causal=causal)
        if self.cross_attn is not None:
            h = self.cross_norm(x)
            x = x + self.cross_attn(h + pos, memory + memory_pos, memory, memory_valid)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class _Adapter(nnx.Module):
    """LLM hidden state -> head width (projection, then LayerNorm in float32)."""

    def __init__(self, llm_hidden: int, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = nnx.Linear(llm_hidden, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(width, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.proj(x))


def box_read(values: Float[Array, "b s n w"], pos_yx: Float[Array, "b s n 2"], valid: Bool[Array, "b s n"],
             boxes: Float[Array, "b s q 4"]) -> Float[Array, "b s q w"]:
    """Each box's Gaussian-weighted mean of the memory tokens around it: weights exp(-d^2/2) with d
    the token centre's offset from the box centre in half box sizes, so a box covering several
    tokens averages them and a box smaller than a token reads its nearest token."""
    centre = boxes[..., None, :2][..., ::-1]  # (b, s, q, 1, 2) as (y, x)
    half = jnp.maximum(boxes[..., None, 2:][..., ::-1] / 2, 1e-3)
    d = (pos_yx[:, :, None].astype(jnp.float32) - centre) / half  # (b, s, q, n, 2)
    logits = jnp.where(valid[:, :, None], -0.5 * jnp.sum(d * d, axis=-1), -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = jnp.where(valid[:, :, None].any(-1, keepdims=True), weights, 0.0)  # a segment without image
    return jnp.einsum("bsqn,bsnw->bsqw", weights.astype(values.dtype), values, preferred_element_type=jnp.float32)


def _gather_rows(hidden: Float[Array, "b l d"], index: Int[Array, "b s n"]) -> Float[Array, "b s n d"]:
    return jax.vmap(lambda h, i: jnp.take(h, i, axis=0, mode="clip"))(hidden, index)


class DetectionHead(nnx.Module):
    """Queries -> per-layer boxes/objectness; matched query states -> captions."""

    def __init__(self, spec: HeadSpec, *, llm_hidden: int, attention_impl: str = "xla",
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 objectness_prior: float = 0.01):
        # static attributes (in the graphdef): what save_detection_head writes as the config
        self.spec, self.llm_hidden = spec, llm_hidden
        self.dtype = dtype
        width = spec.width
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        block = partial(_Block, width, spec.num_heads, spec.mlp_dim, attention_impl=attention_impl, **kw)
        init = nnx.initializers.normal(0.02)
        self.vision_adapter = _Adapter(llm_hidden, width, **kw)
        self.text_adapter = _Adapter(llm_hidden, width, **kw)
        self.stream_embed = nnx.Param(init(rngs.params(), (2, width), param_dtype))
        self.query_content = nnx.Param(init(rngs.params(), (spec.num_queries, width), param_dtype))
        # each query's anchor box (cxcywh before the sigmoid): the first layer's reference, spread
        # uniformly over the image; every layer refines the box it is given
        self.query_anchor = nnx.Param(jax.random.uniform(rngs.params(), (spec.num_queries, 4), param_dtype,
                                                         -2.0, 2.0).at[:, 2:].set(-1.5))
        # reference box -> query position: the sine embedding of its centre (the same as the vision
        # tokens' positions, so a query's cross-attention favours the tokens near its box)
        self.ref_pos = nnx.List([nnx.Linear(width + 2, width, **kw), nnx.Linear(width, width, **kw)])
        self.layers = nnx.List([block(cross_attention=True) for _ in range(spec.num_layers)])
        self.out_norm = nnx.LayerNorm(width, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        # box refinement (pre-sigmoid delta), zero-initialized: the first boxes are the anchors
        self.box_mlp = nnx.List([nnx.Linear(width, width, **kw), nnx.Linear(width, width, **kw),
                                 nnx.Linear(width, 4, kernel_init=nnx.initializers.zeros, **kw)])
        prior_bias = -math.log((1 - objectness_prior) / objectness_prior)
        self.objectness = nnx.Linear(width, 1, bias_init=nnx.initializers.constant(prior_bias), **kw)
        # caption decoder
        # zero-initialized: the box read starts as no change and grows as it helps the captions
        self.box_read = nnx.Linear(width, width, kernel_init=nnx.initializers.zeros, **kw)
        self.caption_prefix = nnx.Linear(width, width, **kw)
        self.caption_token_proj = nnx.Linear(llm_hidden, width, **kw)
        self.caption_pos = nnx.Param(init(rngs.params(), (spec.max_caption_len, width), param_dtype))
        self.caption_blocks = nnx.List([block(cross_attention=False) for _ in range(spec.caption_layers)])
        self.caption_norm = nnx.LayerNorm(width, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

    def memory(self, hidden, det_vision_index, det_vision_mask, det_vision_pos, det_text_index,
               det_text_mask):
        """Per-segment memory values, key position terms and mask: (B, S, NV+NT, ...)."""
        vision = self.vision_adapter(_gather_rows(hidden, det_vision_index).astype(self.dtype))
        text = self.text_adapter(_gather_rows(hidden, det_text_index).astype(self.dtype))
        stream = self.stream_embed[...].astype(jnp.float32)
        memory = jnp.concatenate([vision + stream[0], text + stream[1]], axis=-2)
        vision_pos = sine_position_embedding_2d(det_vision_pos, self.spec.width)
        memory_pos = jnp.concatenate([vision_pos, jnp.zeros_like(text)], axis=-2)
        mask = jnp.concatenate([det_vision_mask, det_text_mask], axis=-1).astype(bool)
        return memory, memory_pos, mask

    def __call__(self, hidden: Float[Array, "b l d"], det_vision_index: Int[Array, "b s nv"],
                 det_vision_mask: Bool[Array, "b s nv"], det_vision_pos: Float[Array, "b s nv 2"],
                 det_text_index: Int[Array, "b s nt"], det_text_mask: Bool[Array, "b s nt"]
                 ) -> dict[str, Array]:
        """Returns boxes (NL, B, S, Q, 4) sigmoid cxcywh, logits (NL, B, S, Q) and queries
        (B, S, Q, W): the final layer's normed query states plus the vision memory read at each
        query's final box (caption prefixes), all float32."""
        memory, memory_pos, mask = self.memory(hidden, det_vision_index, det_vision_mask,
                                               det_vision_pos, det_text_index, det_text_mask)
        memory, memory_pos = memory.astype(self.dtype), memory_pos.astype(self.dtype)
        b, s = det_vision_index.shape[:2]
        shape = (b, s, self.spec.num_queries)
        x = jnp.broadcast_to(self.query_content[...].astype(jnp.float32), (*shape, self.spec.width))
        ref = jnp.broadcast_to(self.query_anchor[...].astype(jnp.float32), (*shape, 4))  # pre-sigmoid
        states, boxes = [], []
        for layer in self.layers:
            x = layer(x, self._ref_pos(jax.nn.sigmoid(ref)), memory=memory, memory_pos=memory_pos,
                      memory_valid=mask)
            states.append(self.out_norm(x))
            # a refinement of the given box; the next layer starts from it without a gradient
            # through it (each layer's box loss trains that layer's delta)
            box_logit = ref + self._box_delta(states[-1])
            boxes.append(jax.nn.sigmoid(box_logit))
            ref = jax.lax.stop_gradient(box_logit)
        states, boxes = jnp.stack(states), jnp.stack(boxes)  # (NL, B, S, Q, W), (NL, B, S, Q, 4)
        logits = self.objectness(states.astype(self.dtype))[..., 0].astype(jnp.float32)
        nv = det_vision_index.shape[-1]
        seen = box_read(memory[..., :nv, :], det_vision_pos, det_vision_mask.astype(bool),
                        jax.lax.stop_gradient(boxes[-1]))
        queries = states[-1] + self.box_read(seen.astype(self.dtype)).astype(jnp.float32)
        return {"boxes": boxes, "logits": logits, "queries": queries}

    def _ref_pos(self, box: Float[Array, "*q 4"]) -> Float[Array, "*q w"]:
        """Query position of a reference box: its centre's sine embedding and its size, through an MLP."""
        h = jnp.concatenate([sine_position_embedding_2d(box[..., 1::-1], self.spec.width), box[..., 2:]], -1)
        h = jax.nn.relu(self.ref_pos[0](h.astype(self.dtype)))
        return self.ref_pos[1](h)

    def _box_delta(self, state: Float[Array, "*q w"]) -> Float[Array, "*q 4"]:
        h = state.astype(self.dtype)
        for i, lin in enumerate(self.box_mlp):
            h = lin(h) if i == len(self.box_mlp) - 1 else jax.nn.relu(lin(h))
        return h.astype(jnp.float32)

    def caption_embeddings(self, embed_table: Float[Array, "v d"], caption_vocab: Int[Array, " k"]
                           ) -> Float[Array, "k w"]:
        """Caption-vocabulary token embeddings in head width (inputs and output scores)."""
        return self.caption_token_proj(jnp.take(embed_table, caption_vocab, axis=0).astype(self.dtype))

    def _decode(self, prefix, tokens_w, vocab_w):
        """Causal decoder over [prefix, tokens...] -> float32 scores against the vocabulary."""
        x = jnp.concatenate([prefix[..., None, :], tokens_w], axis=-2).astype(jnp.float32)
        c = x.shape[-2]
        pos = self.caption_pos[:c].astype(self.dtype)
        for block in self.caption_blocks:
            x = block(x, pos, causal=True)
        h = self.caption_norm(x).astype(self.dtype)
        return jnp.einsum("...cw,kw->...ck", h, vocab_w.astype(self.dtype),
                          preferred_element_type=jnp.float32)

    def caption_logits(self, query_states: Float[Array, "*n w"], caption_index: Int[Array, "*n c"],
                       embed_table: Float[Array, "v d"], caption_vocab: Int[Array, " k"]
                       ) -> Float[Array, "*n c k"]:
        """Teacher-forced scores: position t predicts caption_index[t] from the query state and
        caption_index[:t] (vocabulary indices, see ``caption_vocab_index``)."""
        c = caption_index.shape[-1]
        if c > self.spec.max_caption_len:
            raise ValueError(f"caption length {c} exceeds max_caption_len {self.spec.max_caption_len}")
        vocab_w = self.caption_embeddings(embed_table, caption_vocab)
        prefix = self.caption_prefix(query_states.astype(self.dtype))
        tokens_w = jnp.take(vocab_w, caption_index[..., :-1], axis=0)
        return self._decode(prefix, tokens_w, vocab_w)

    def greedy_captions(self, query_states: Float[Array, "n w"], embed_table: Float[Array, "v d"],
                        caption_vocab: Int[Array, " k"], end_token_id: int | Int[Array, ""]
                        ) -> tuple[Int[Array, "n c"], Int[Array, " n"]]:
        """Greedy decoding to max_caption_len tokens: (LLM token ids, caption lengths before the
        end token). Ids after the end token are the end token. Recomputes the prefix each step
        (no KV cache): captions are a few dozen tokens and the decoder is small."""
        n, c = query_states.shape[0], self.spec.max_caption_len
        vocab_w = self.caption_embeddings(embed_table, caption_vocab)
        prefix = self.caption_prefix(query_states.astype(self.dtype))
        end_index, _ = caption_vocab_index(jnp.asarray(end_token_id), caption_vocab)

        def step(t, carry):
            tokens, done = carry
            tokens_w = jnp.take(vocab_w, tokens[:, :-1], axis=0)
            scores = self._decode(prefix, tokens_w, vocab_w)[:, t]
            nxt = jnp.where(done, end_index, jnp.argmax(scores, axis=-1).astype(jnp.int32))
            return tokens.at[:, t].set(nxt), done | (nxt == end_index)

        tokens = jnp.full((n, c), end_index, jnp.int32)
        tokens, _ = jax.lax.fori_loop(0, c, step, (tokens, jnp.zeros((n,), bool)))
        is_end = tokens == end_index
        lengths = jnp.where(is_end.any(-1), jnp.argmax(is_end, -1), c).astype(jnp.int32)
        return caption_vocab[tokens], lengths
