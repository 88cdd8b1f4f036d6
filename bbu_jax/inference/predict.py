"""predict_detection: one forward through the LLM and the detection head per image, no generation.

The head reads the student image's tokens and prompt tokens from the LLM's final hidden states,
so a detection costs one prefill plus a few dozen steps of the small caption decoder, instead of
generating the whole JSON answer token by token. Boxes come back in pixels of the image file as
given (the coordinates the JSONL's boxes use).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from bbu_jax.data.batch import HEAD_INPUTS, MODEL_INPUTS
from bbu_jax.data.collate import Budgets, collate
from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.schema import Example
from bbu_jax.models.detection_head import DetectionHead
from bbu_jax.models.detection_head_files import check_head_fits_model
from bbu_jax.models.qwen2_5_vl import Qwen25VL
from bbu_jax.models.qwen2_5_vl.processing import ImageInput


@dataclasses.dataclass
class Detections:
    """One image's detections, best score first."""
    boxes: np.ndarray  # (N, 4) xyxy, pixels of the image file
    scores: np.ndarray  # (N,)
    captions: list[str]

    def as_dict(self) -> dict:
        return {"boxes": self.boxes, "scores": self.scores, "captions": self.captions}


@nnx.jit(static_argnames=("top_k",))
def detect(model: Qwen25VL, head: DetectionHead, batch: dict[str, Array], caption_vocab: Int[Array, " k"],
           end_token_id: Int[Array, ""], top_k: int
           ) -> tuple[Float[Array, "b s t 4"], Float[Array, "b s t"], Int[Array, "b s t c"], Int[Array, "b s t"]]:
    """Per segment, the top_k queries by objectness: boxes (normalized cxcywh of the student image),
    scores, greedy caption token ids (LLM ids) and caption lengths."""
    hidden = model(**{k: batch[k] for k in MODEL_INPUTS})
    return detect_from_outputs(model, head, head(hidden, *(batch[k] for k in HEAD_INPUTS)), caption_vocab,
                               end_token_id, top_k)


def detect_from_outputs(model: Qwen25VL, head: DetectionHead, out: dict[str, Array],
                        caption_vocab: Int[Array, " k"], end_token_id: Int[Array, ""], top_k: int):
    """detect() given the head's outputs (inside jit, e.g. beside the loss in evaluation)."""
    scores, idx = jax.lax.top_k(jax.nn.sigmoid(out["logits"][-1]), top_k)
    boxes = jnp.take_along_axis(out["boxes"][-1], idx[..., None], axis=2)
    states = jnp.take_along_axis(out["queries"], idx[..., None], axis=2)
    b, s, k, w = states.shape
    ids, lengths = head.greedy_captions(states.reshape(b * s * k, w), model.embed_table(), caption_vocab,
                                        end_token_id)
    return boxes, scores, ids.reshape(b, s, k, -1), lengths.reshape(b, s, k)


def to_pixels(boxes_cxcywh: np.ndarray, height: float, width: float) -> np.ndarray:
    """Normalized cxcywh -> xyxy pixels of an image of the given size."""
    cx, cy, w, h = np.moveaxis(np.asarray(boxes_cxcywh, np.float64), -1, 0)
    return np.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                     (cx + w / 2) * width, (cy + h / 2) * height], axis=-1)


def decode_detections(boxes, scores, ids, lengths, metas, tokenizer, *, score_threshold: float
                      ) -> dict[tuple[int, int], Detections]:
    """Host side of detect(): threshold, pixels, caption text; keyed by (row, segment)."""
    boxes, scores, ids, lengths = (np.asarray(x) for x in (boxes, scores, ids, lengths))
    out = {}
    for row_meta in metas:
        for meta in row_meta:
            r, s = meta["row"], meta["segment"] - 1
            keep = scores[r, s] >= score_threshold
            height, width = meta["stored_hw"]  # the image file as given (JSONL boxes use it too)
            captions = [tokenizer.decode(ids[r, s, q, :lengths[r, s, q]].tolist(), skip_special_tokens=True)
                        for q in np.flatnonzero(keep)]
            out[r, s + 1] = Detections(to_pixels(boxes[r, s][keep], height, width).astype(np.float32),
                                       scores[r, s][keep].astype(np.float32), captions)
    return out


def predict_detection(model: Qwen25VL, head: DetectionHead, images: Sequence[ImageInput], *,
                      encoder: SampleEncoder, caption_vocab: np.ndarray, score_threshold: float = 0.3,
                      top_k: int = 100, teachers: Sequence[Example] = (), batch_size: int = 4
                      ) -> list[Detections]:
    """Detections for each image (a path, PIL image or uint8 array; boxes in pixels of the image as
    given), ``batch_size`` at a time.

    Budgets are rounded up (tokens to 64, patches to 256) so similar images share a compilation.
    """
    check_head_fits_model(head, model.config, caption_vocab)
    vocab = jnp.asarray(caption_vocab, jnp.int32)
    end_id = jnp.int32(encoder.ids["<|im_end|>"])
    k = min(top_k, head.spec.num_queries)
    results: list[Detections] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        samples = [encoder.encode(Example((image,), ()), teachers, source=_name(image, start + i),
                                  record_id=_name(image, start + i), with_answer=False)
                   for i, image in enumerate(chunk)]
        budgets = Budgets(
            rows=batch_size, segments=1, objects=1, caption_tokens=1,
            tokens=_round_up(max(s.num_tokens for s in samples), 64),
            patches=_round_up(max(s.num_patches for s in samples), 256),
            vision_memory=_round_up(max(len(s.det_vision_index) for s in samples), 64),
            text_memory=_round_up(max(len(s.det_text_index) for s in samples), 16))
        batch, metas = collate([[s] for s in samples], budgets)
        dets = decode_detections(*detect(model, head, batch, vocab, end_id, k), metas, encoder.tokenizer,
                                 score_threshold=score_threshold)
        results.extend(dets[r, 1] for r in range(len(chunk)))
    return results


def _name(image: ImageInput, index: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)
