"""Conversation building and tokenization with supervision spans.

The text is rendered exactly as Qwen2.5-VL's chat template renders the equivalent messages
(`chat_messages` gives those messages, so a test can compare with `apply_chat_template`), then
tokenized ONCE with the model's own tokenizer; character offsets map tokens to spans. Each image
is one `<|image_pad|>` in the text and is expanded to its merged-token count after tokenization
(as Qwen2_5_VLProcessor expands it before), so the tokenizer never sees thousands of pads.

Supervision: assistant content + `<|im_end|>`. Unlike the official qwen-vl-finetune code we do NOT
supervise the "\n" after `<|im_end|>`: generation stops at `<|im_end|>`, so that newline is
template filler the model never has to produce. Teacher answers are kind 1, the student's kind 2.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence

import numpy as np

SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTIONS = {
    "en": ("Detect every BBU equipment part in the image. Answer with a JSON list of objects, each with "
           "bbox_2d [x1, y1, x2, y2] in pixels and desc."),
    "zh": "检测图中所有BBU设备部件，以JSON列表回答，每个对象包含bbox_2d和desc。",
}
LANGUAGES = tuple(sorted(INSTRUCTIONS))  # the answer languages (config, scripts and conversion check against it)
IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"
KIND_NONE, KIND_TEACHER, KIND_STUDENT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Turn:
    """One demonstration (teacher) or the query (student): its images' token counts and answer."""
    num_image_tokens: tuple[int, ...]
    answer: str | None  # None: leave the assistant turn open (inference prompt)
    kind: int  # KIND_TEACHER or KIND_STUDENT


@dataclasses.dataclass(frozen=True)
class Tokenized:
    input_ids: np.ndarray  # (L,) int32, image pads expanded
    supervised_kind: np.ndarray  # (L,) int8: kind of each token as a label (0 = not supervised)
    student_image_spans: tuple[tuple[int, int], ...]  # [start, end) of each student image's pads
    student_prompt_span: tuple[int, int]  # [start, end) of the student's instruction tokens
    image_spans: tuple[tuple[int, int], ...]  # every image (teachers first), in text order


def format_answer(objects: Sequence[tuple[Sequence[int], str]]) -> str:
    """Qwen2.5-VL grounding JSON in a ```json fence, objects top-to-bottom then left-to-right."""
    ordered = sorted(objects, key=lambda o: (o[0][1], o[0][0], o[0][3], o[0][2], o[1]))
    body = json.dumps([{"bbox_2d": [int(v) for v in box], "desc": desc} for box, desc in ordered],
                      ensure_ascii=False)
    return f"```json\n{body}\n```"


def chat_messages(turns: Sequence[Turn], language: str, system_prompt: str = SYSTEM_PROMPT,
                  instruction: str | None = None) -> list[dict]:
    """The same conversation as HF chat messages (what apply_chat_template would render)."""
    msgs = [{"role": "system", "content": system_prompt}]
    for turn in turns:
        content = [{"type": "image"} for _ in turn.num_image_tokens]
        text = INSTRUCTIONS[language] if instruction is None else instruction
        msgs.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
        if turn.answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
    return msgs


@functools.lru_cache(maxsize=8)
def special_ids(tokenizer) -> dict[str, int]:
    names = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    ids = {n: tokenizer.convert_tokens_to_ids(n) for n in names}
    missing = [n for n, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks Qwen special tokens {missing}")
    return ids


def tokenize_conversation(tokenizer, turns: Sequence[Turn], language: str,
                          system_prompt: str = SYSTEM_PROMPT, instruction: str | None = None) -> Tokenized:
    """Render + tokenize; the last turn must be the student. An open last turn gets the
    generation prompt `<|im_start|>assistant\\n` (inference). ``instruction``: the user text of
    every turn (default: the language's INSTRUCTIONS entry; a trained model's recorded one)."""
    if language not in INSTRUCTIONS:
        raise ValueError(f"language must be one of {sorted(INSTRUCTIONS)}, got {language!r}")
    instr = INSTRUCTIONS[language] if instruction is None else instruction
    parts: list[str] = [f"<|im_start|>system\n{system_prompt}<|im_end|>\n"]
    pos = len(parts[0])
    spans = []  # (char_start, char_end, kind) supervised
    prompt_chars = (0, 0)
    for i, turn in enumerate(turns):
        head = "<|im_start|>user\n" + IMAGE_TEXT * len(turn.num_image_tokens)
        if i == len(turns) - 1:
            prompt_chars = (pos + len(head), pos + len(head) + len(instr))
        user = head + instr + "<|im_end|>\n"
        parts.append(user)
        pos += len(user)
        header = "<|im_start|>assistant\n"
        if turn.answer is None:
            if i != len(turns) - 1:
                raise ValueError("only the last (student) turn may leave its answer open")
            parts.append(header)
            pos += len(header)
            continue
        body = turn.answer + "<|im_end|>"
        spans.append((pos + len(header), pos + len(header) + len(body), turn.kind))
        parts.append(header + body + "\n")
        pos += len(header) + len(body) + 1
    text = "".join(parts)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int64)
    starts = np.asarray([o[0] for o in enc["offset_mapping"]], np.int64)
    ends = np.asarray([o[1] for o in enc["offset_mapping"]], np.int64)
    kind = np.zeros(ids.shape, np.int8)
    for a, b, k in spans:
        kind[(starts >= a) & (ends <= b) & (ends > starts)] = k
    prompt = np.flatnonzero((starts >= prompt_chars[0]) & (ends <= prompt_chars[1]) & (ends > starts))

    # expand each <|image_pad|> to its merged-token count
    pad = special_ids(tokenizer)["<|image_pad|>"]
    counts = [n for t in turns for n in t.num_image_tokens]
    pad_at = np.flatnonzero(ids == pad)
    if len(pad_at) != len(counts):
        raise ValueError(f"text has {len(pad_at)} image pads for {len(counts)} images")
    repeat = np.ones(ids.shape, np.int64)
    repeat[pad_at] = counts
    new_start = np.concatenate([[0], np.cumsum(repeat)[:-1]])
    image_spans = tuple((int(new_start[p]), int(new_start[p]) + n) for p, n in zip(pad_at, counts))
    n_student = len(turns[-1].num_image_tokens)
    return Tokenized(
        input_ids=np.repeat(ids, repeat).astype(np.int32),
        supervised_kind=np.repeat(kind, repeat),
        student_image_spans=image_spans[len(image_spans) - n_student:],
        student_prompt_span=(int(new_start[prompt[0]]), int(new_start[prompt[-1]]) + 1) if len(prompt) else (0, 0),
        image_spans=image_spans,
    )
