"""One training sample (student + teachers) -> per-sample arrays, before packing.

Everything here is local to the sample (token positions from 0, window/image ids from 1, merged
indices from 0); the collator offsets them when it places the sample in a row. Boxes in the JSONL
are pixels of the stored image; the answer text uses pixels of the image the model sees (the
smart_resize of the stored image — identical when conversion used the same pixel limits), and
gt_boxes are normalized cxcywh of that image. The student has one image (schema.py rejects a
record with more): the detection targets and the vision memory are that image's.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from bbu_jax.data import chat
from bbu_jax.data.convert import scale_box
from bbu_jax.data.schema import Example, Record, RecordError
from bbu_jax.foundation.files import write_json_atomic
from bbu_jax.models.qwen2_5_vl.config import Qwen25VLConfig, check_model_dir
from bbu_jax.models.qwen2_5_vl.processing import ImageInput, image_pixels, load_image
from bbu_jax.models.qwen2_5_vl.processing import rope_index, vision_layout

END_TOKEN = "<|im_end|>"


@dataclasses.dataclass
class EncodedSample:
    input_ids: np.ndarray  # (L,) int32
    targets: np.ndarray  # (L,) int32, shifted: label of the token after each position
    target_kind: np.ndarray  # (L,) int8
    positions: np.ndarray  # (3, L) int32, from 0
    patches: np.ndarray  # (N, 588) uint8 pixels, window order
    patch_pos: np.ndarray  # (N, 2) int32
    patch_window_ids: np.ndarray  # (N,) int32, 1-based
    patch_image_ids: np.ndarray  # (N,) int32, 1-based
    vision_token_index: np.ndarray  # (L,) int32, merged index (window order) at image pads, else -1
    det_vision_index: np.ndarray  # (NV,) int32 token positions of the student's (first) image
    det_vision_pos: np.ndarray  # (NV, 2) float32 normalized (y, x) merged-token centres
    det_text_index: np.ndarray  # (NT,) int32 token positions of the student's instruction
    gt_boxes: np.ndarray  # (M, 4) float32 normalized cxcywh
    gt_caption_ids: list[np.ndarray]  # M arrays: desc token ids + END_TOKEN
    rope_delta: int
    meta: dict  # id, source, image, resized_hw, stored_hw, orig_size, num_teachers

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.patches.shape[0])


def read_vision_config(model_dir: str) -> dict:
    """spatial_merge_size / window_size / patch_size from the model folder's config.json (a
    Qwen2.5-VL one; otherwise one line naming what is missing)."""
    v = Qwen25VLConfig.from_file(check_model_dir(model_dir) / "config.json").vision
    return {"spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size, "patch_size": v.patch_size}


class SampleEncoder:
    """Picklable: the tokenizer is loaded lazily in whichever process encodes (grain workers)."""

    def __init__(self, model_dir: str, *, min_pixels: int, max_pixels: int, language: str,
                 system_prompt: str = chat.SYSTEM_PROMPT, instruction: str | None = None,
                 image_cache_size: int = 64):
        if language not in chat.INSTRUCTIONS:
            raise ValueError(f"language must be one of {sorted(chat.INSTRUCTIONS)}, got {language!r}")
        self.model_dir = os.fspath(check_model_dir(model_dir, tokenizer=True))
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.language, self.system_prompt = language, system_prompt
        self.instruction = chat.INSTRUCTIONS[language] if instruction is None else instruction
        self.vision = read_vision_config(self.model_dir)
        if self.vision["patch_size"] != 14:
            raise ValueError("the image processor is fixed to patch_size 14")
        self.image_cache_size = image_cache_size
        self._tokenizer = None
        self._images: collections.OrderedDict = collections.OrderedDict()
        self._captions: dict[str, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_tokenizer=None, _images=collections.OrderedDict(), _captions={})
        return state

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            # local_files_only: a folder path never turns into a hub download
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        return self._tokenizer

    @property
    def ids(self) -> dict[str, int]:
        return chat.special_ids(self.tokenizer)

    def caption_ids(self, desc: str) -> np.ndarray:
        if desc not in self._captions:
            ids = self.tokenizer(desc, add_special_tokens=False)["input_ids"]
            self._captions[desc] = np.asarray(ids + [self.ids[END_TOKEN]], np.int32)
        return self._captions[desc]

    def load_image(self, image: ImageInput, source: str):
        """(patch pixels, grid_thw, stored (h, w)) of a file path, PIL image or uint8 array; a small
        LRU keeps files (pool teachers' images) hot."""
        cached = isinstance(image, (str, os.PathLike))
        if cached and image in self._images:
            self._images.move_to_end(image)
            return self._images[image]
        try:
            im = load_image(image)  # upright, as conversion stored it and annotators saw it
            pixels, grid = image_pixels(im, self.min_pixels, self.max_pixels)
            loaded = (pixels, grid, (im.height, im.width))
        except (OSError, ValueError) as e:
            what = image if cached else f"{type(image).__name__} {getattr(image, 'shape', getattr(image, 'size', ''))}"
            raise RecordError(f"{source}: cannot read image {what} ({e})") from None
        if cached:
            self._images[image] = loaded
            if len(self._images) > self.image_cache_size:
                self._images.popitem(last=False)
        return loaded

    def _turn(self, ex: Example, kind: int, source: str, with_answer: bool):
        loaded = [self.load_image(p, source) for p in ex.images]
        m = self.vision["spatial_merge_size"]
        sh, sw = loaded[0][2]
        rh, rw = int(loaded[0][1][1]) * 14, int(loaded[0][1][2]) * 14
        objects = []
        for o in ex.objects:
            if o.bbox[2] > sw or o.bbox[3] > sh:
                raise RecordError(f"{source}: bbox_2d {list(o.bbox)} ({o.desc}) out of bounds of the "
                                  f"{sw}x{sh} image {ex.images[0]}")
            box = scale_box(o.bbox, (sw, sh), (rw, rh))
            if box is None:
                raise RecordError(f"{source}: bbox_2d {list(o.bbox)} vanishes at the model's {rw}x{rh}")
            objects.append((box, o.desc))
        answer = chat.format_answer(objects) if with_answer else None
        turn = chat.Turn(tuple(int(np.prod(g)) // (m * m) for _, g, _ in loaded), answer, kind)
        return turn, loaded, objects, (rh, rw), (sh, sw)

    def encode(self, student: Example, teachers: Sequence[Example], *, source: str, record_id: str,
               orig_size=None, with_answer: bool = True) -> EncodedSample:
        """Build the conversation, tokenize and prepare every host-side index of one sample."""
        turns, all_images = [], []
        for t in teachers:
            turn, loaded, *_ = self._turn(t, chat.KIND_TEACHER, source, True)
            turns.append(turn)
            all_images += loaded
        turn, loaded, objects, resized_hw, stored_hw = self._turn(student, chat.KIND_STUDENT, source, with_answer)
        turns.append(turn)
        all_images += loaded
        tok = chat.tokenize_conversation(self.tokenizer, turns, self.language, self.system_prompt,
                                         self.instruction)
        ids = tok.input_ids
        L = ids.shape[0]
        targets = np.zeros(L, np.int32)
        kinds = np.zeros(L, np.int8)
        targets[:-1] = np.where(tok.supervised_kind[1:] > 0, ids[1:], 0)
        kinds[:-1] = tok.supervised_kind[1:]

        m = self.vision["spatial_merge_size"]
        grids = [tuple(int(x) for x in g) for _, g, _ in all_images]
        positions, delta = rope_index(ids, grids, image_token_id=self.ids["<|image_pad|>"],
                                      vision_start_token_id=self.ids["<|vision_start|>"], spatial_merge_size=m)
        lay = vision_layout(grids, window_size=self.vision["window_size"], patch_size=14, spatial_merge_size=m)
        pixels = np.concatenate([p for p, _, _ in all_images])
        vti = np.full(L, -1, np.int32)
        pad_pos = np.concatenate([np.arange(a, b) for a, b in tok.image_spans])
        vti[pad_pos] = lay.merged_index

        a, b = tok.student_image_spans[0]
        gh, gw = grids[len(grids) - len(student.images)][1:]
        yy, xx = np.meshgrid((np.arange(gh // m) + 0.5) / (gh // m), (np.arange(gw // m) + 0.5) / (gw // m),
                             indexing="ij")
        rh, rw = resized_hw
        boxes = np.asarray([b_ for b_, _ in objects], np.float32).reshape(-1, 4)
        cxcywh = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / rw, (boxes[:, 1] + boxes[:, 3]) / 2 / rh,
                           (boxes[:, 2] - boxes[:, 0]) / rw, (boxes[:, 3] - boxes[:, 1]) / rh], -1)
        p0, p1 = tok.student_prompt_span
        return EncodedSample(
            input_ids=ids, targets=targets, target_kind=kinds, positions=positions,
            patches=pixels[lay.perm], patch_pos=lay.pos, patch_window_ids=lay.window_ids,
            patch_image_ids=lay.image_ids, vision_token_index=vti,
            det_vision_index=np.arange(a, b, dtype=np.int32),
            det_vision_pos=np.stack([yy.reshape(-1), xx.reshape(-1)], -1).astype(np.float32),
            det_text_index=np.arange(p0, p1, dtype=np.int32),
            gt_boxes=cxcywh.astype(np.float32),
            gt_caption_ids=[self.caption_ids(d) for _, d in objects],
            rope_delta=delta,
            meta={"id": record_id, "source": source, "image": student.images[0], "resized_hw": resized_hw,
                  "stored_hw": stored_hw, "orig_size": orig_size, "num_teachers": len(teachers)},
        )


def choose_teachers(record: Record, pool: Sequence[Example], rng: np.random.Generator,
                    teacher_ratio: float, max_teachers: int) -> tuple[Example, ...]:
    """With prob teacher_ratio 1..max_teachers demonstrations, from the record's own teachers when
    it carries them (a random subset, in the record's order), else distinct pool entries never
    showing the student's own image."""
    if max_teachers < 1 or (record.teachers is None and not pool) or rng.random() >= teacher_ratio:
        return ()
    if record.teachers is not None:
        own = record.teachers
        n = min(int(rng.integers(1, max_teachers + 1)), len(own))
        return tuple(own[i] for i in sorted(rng.choice(len(own), n, replace=False).tolist())) if n else ()
    candidates = [i for i, p in enumerate(pool) if not set(p.images) & set(record.student.images)]
    n = min(int(rng.integers(1, max_teachers + 1)), len(candidates))
    return tuple(pool[i] for i in sorted(rng.choice(candidates, n, replace=False).tolist())) if n else ()


def build_caption_vocab(jsonl_paths: Sequence[str], tokenizer, *, skip_bad_samples: bool = False) -> np.ndarray:
    """Sorted unique token ids of every desc in these files (all three forms) + END_TOKEN; bad
    lines raise, or are left out when skip_bad_samples (the loader skips them too)."""
    from bbu_jax.data.schema import load_records
    descs = set()
    for path in jsonl_paths:
        records, _ = load_records(path, skip_bad_samples=skip_bad_samples)
        for r in records:
            for ex in (r.student, *(r.teachers or ())):
                descs.update(o.desc for o in ex.objects)
    ids = {tokenizer.convert_tokens_to_ids(END_TOKEN)}
    for d in sorted(descs):
        ids.update(tokenizer(d, add_special_tokens=False)["input_ids"])
    return np.asarray(sorted(ids), np.int32)


def save_caption_vocab(path: str, vocab: np.ndarray) -> None:
    write_json_atomic(path, {"caption_vocab": [int(i) for i in vocab]})


def load_caption_vocab(path: str) -> np.ndarray:
    with open(path) as f:
        return np.asarray(json.load(f)["caption_vocab"], np.int32)
