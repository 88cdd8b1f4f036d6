"""Autoregressive generation with a KV cache: one jitted prefill + while-loop of decode steps.

Shapes are fixed per call: prompts are left-padded to a length bucket (so every row's last prompt
token sits at the same index and similar prompts share one compilation), patches are padded to a
patch bucket, the batch to ``batch_size`` rows (extra rows are empty and start finished), and the
cache holds prompt + ``max_new_tokens`` slots. The loop stops early once every row has emitted a
stop token; a finished row keeps emitting ``pad_id``.

M-RoPE for generated tokens follows transformers' rope_delta rule: the first generated token of a
row sits at (max prompt position + 1) on all three rows, the next one after it, and so on.

Prompts are built exactly as training builds samples (``bbu_jax.data.pipeline.build_inference_inputs``:
demonstrations first, then the student's images and instruction, then the open assistant turn);
``bbu_jax.inference.predictor.Predictor.generate`` is the user-facing entry point.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from bbu_jax.data import chat
from bbu_jax.data.encode import END_TOKEN
from bbu_jax.models.qwen2_5_vl.model import Qwen25VL

# The model's inputs for a prompt: token fields are (B, L) / (B, 3, L), patch fields (B, P, ...).
TOKEN_FIELDS = ("input_ids", "positions", "segment_ids", "vision_token_index")
PATCH_FIELDS = ("patches", "patch_pos", "patch_window_ids", "patch_image_ids")
PROMPT_FIELDS = TOKEN_FIELDS + PATCH_FIELDS
_FILL = {"vision_token_index": -1}
MAX_STOP_IDS = 4


def round_up(n: int, multiple: int) -> int:
    return max(1, -(-n // multiple)) * multiple


def pad_prompts(prompts: Sequence[dict[str, np.ndarray]], *, rows: int, length: int,
                num_patches: int) -> dict[str, np.ndarray]:
    """Stack prompt batches into ``rows`` rows: tokens left-padded to ``length``, patches
    right-padded to ``num_patches``, missing rows empty (segment id 0 everywhere)."""
    out = {}
    for name in PROMPT_FIELDS:
        parts = [np.asarray(p[name]) for p in prompts]
        axis = parts[0].ndim - 1 if name in TOKEN_FIELDS else 1
        size = length if name in TOKEN_FIELDS else num_patches
        padded = []
        for a in parts:
            if a.shape[axis] > size:
                raise ValueError(f"{name}: {a.shape[axis]} exceeds the budget {size}")
            widths = [(0, 0)] * a.ndim
            widths[axis] = (size - a.shape[axis], 0) if name in TOKEN_FIELDS else (0, size - a.shape[axis])
            padded.append(np.pad(a, widths, constant_values=_FILL.get(name, 0)))
        stacked = np.concatenate(padded, axis=0)
        if stacked.shape[0] > rows:
            raise ValueError(f"{stacked.shape[0]} prompts do not fit {rows} rows")
        empty = np.full((rows - stacked.shape[0], *stacked.shape[1:]), _FILL.get(name, 0), stacked.dtype)
        out[name] = np.concatenate([stacked, empty], axis=0)
    if np.any(out["segment_ids"] > 1):
        raise ValueError("a prompt row must hold one segment (segment ids 0/1)")
    return out


def sample_logits(logits: Float[Array, "b v"], key: jax.Array, temperature: Float[Array, ""],
                  top_p: Float[Array, ""]) -> Int[Array, " b"]:
    """Temperature + nucleus sampling: keep the smallest set of most likely tokens whose
    probability reaches ``top_p`` (at least the top one), sample among them."""
    logits = logits.astype(jnp.float32) / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens",))
def _generate(model: Qwen25VL, prompt: dict[str, jax.Array], key: jax.Array, temperature, top_p,
              stop_ids: Int[Array, " k"], pad_id, *, max_new_tokens: int) -> Int[Array, "b n"]:
    seg = prompt["segment_ids"]
    b, length = seg.shape
    kv_seg = jnp.concatenate([seg, jnp.ones((b, max_new_tokens), seg.dtype)], axis=1)
    logits, cache = model.prefill(cache=model.init_cache(b, length + max_new_tokens), kv_segment_ids=kv_seg,
                                  **prompt)
    first_pos = jnp.max(jnp.where(seg[:, None] > 0, prompt["positions"], -1), axis=(1, 2)) + 1

    def cond(state):
        _, t, _, _, _, done, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        model, t, tokens, logits, cache, done, key = state
        key, sub = jax.random.split(key)
        tok = jax.lax.cond(temperature > 0, lambda: sample_logits(logits, sub, temperature, top_p),
                           lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, t].set(tok)
        done = done | jnp.any(tok[:, None] == stop_ids, axis=-1)
        logits, cache = model.decode_step(tok, first_pos + t, cache, length + t, kv_seg)
        return model, t + 1, tokens, logits, cache, done, key

    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = ~jnp.any(seg > 0, axis=1)  # empty filler rows
    state = (model, jnp.int32(0), tokens, logits, cache, done, key)
    return nnx.while_loop(cond, body, state)[2]


def generate_tokens(model: Qwen25VL, prompt: dict[str, np.ndarray], *, max_new_tokens: int,
                    stop_ids: Sequence[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int = 0) -> np.ndarray:
    """New token ids (B, max_new_tokens) for a left-padded prompt batch (``PROMPT_FIELDS``).

    ``temperature == 0`` is greedy. A row ends with its first stop token (included) followed by
    ``pad_id``; with no stop ids every row runs to ``max_new_tokens``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if len(stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
    stops = np.full(MAX_STOP_IDS, -1, np.int32)  # a fixed shape: any stop set shares the compilation
    stops[:len(stop_ids)] = stop_ids
    batch = {k: jnp.asarray(prompt[k]) for k in PROMPT_FIELDS}
    out = _generate(model, batch, jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p),
                    jnp.asarray(stops), jnp.int32(pad_id),
                    max_new_tokens=int(max_new_tokens))
    return np.asarray(out)


def cut_at_stop(tokens: Sequence[int] | Int[np.ndarray, " n"], stop_ids: Sequence[int]) -> list[int]:
    """The tokens before the first stop token (all of them when none was emitted); ``tokens`` is
    e.g. one row of ``generate_tokens``."""
    tokens = [int(t) for t in tokens]
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens


def default_stop_ids(tokenizer) -> tuple[int, ...]:
    """`<|im_end|>` (the trained end of an answer) and `<|endoftext|>` (Qwen's other eos)."""
    end = chat.special_ids(tokenizer)[END_TOKEN]  # raises on a tokenizer without Qwen's specials
    other = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return (end,) if other is None or other == tokenizer.unk_token_id else (end, other)


def generate_from_inputs(model: Qwen25VL, tokenizer, inputs: Sequence[dict[str, np.ndarray]], *,
                         max_new_tokens: int, batch_size: int = 8, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int = 0, length_bucket: int = 256,
                         patch_bucket: int = 1024, stop_ids: Sequence[int] | None = None) -> list[str]:
    """Answers for prompts given as model inputs (e.g. ``build_inference_inputs``' batches),
    ``batch_size`` at a time; chunk k samples with seed ``seed + k``."""
    stop_ids = default_stop_ids(tokenizer) if stop_ids is None else tuple(stop_ids)
    pad_id = stop_ids[0] if stop_ids else 0
    texts = []
    for k, start in enumerate(range(0, len(inputs), batch_size)):
        chunk = inputs[start:start + batch_size]
        prompt = pad_prompts(chunk, rows=batch_size,
                             length=round_up(max(p["input_ids"].shape[-1] for p in chunk), length_bucket),
                             num_patches=round_up(max(p["patches"].shape[1] for p in chunk), patch_bucket))
        tokens = generate_tokens(model, prompt, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                                 temperature=temperature, top_p=top_p, seed=seed + k)
        texts += [tokenizer.decode(cut_at_stop(row, stop_ids)) for row in tokens[:len(chunk)]]
    return texts

