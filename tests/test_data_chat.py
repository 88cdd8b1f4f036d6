"""Conversation text vs transformers' chat template, labels and teacher/student kinds."""
import json

import numpy as np
import pytest

from bbu_jax.data import chat
from bbu_jax.data.encode import build_caption_vocab, load_caption_vocab, save_caption_vocab


@pytest.fixture(scope="module")
def tok(tiny_hf_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_hf_dir)


def _expand(ids, pad, counts):
    counts, out = iter(counts), []
    for i in ids:
        out += [i] * next(counts) if i == pad else [i]
    return out


ANSWER = chat.format_answer([([10, 50, 60, 90], "螺丝连接点/BBU安装螺丝/连接正确"), ([5, 5, 30, 30], "label/cable label/readable")])


def test_format_answer_orders_top_to_bottom_then_left_to_right():
    a = chat.format_answer([([50, 10, 60, 20], "b"), ([5, 10, 9, 20], "a"), ([0, 0, 4, 4], "c")])
    assert a.startswith("```json\n") and a.endswith("\n```")
    assert [o["desc"] for o in json.loads(a[8:-4])] == ["c", "a", "b"]


@pytest.mark.parametrize("language", ["en", "zh"])
@pytest.mark.parametrize("turns", [
    [chat.Turn((6,), ANSWER, chat.KIND_STUDENT)],
    [chat.Turn((4,), ANSWER, chat.KIND_TEACHER), chat.Turn((6, 2), "```json\n[]\n```", chat.KIND_STUDENT)],
    [chat.Turn((4,), ANSWER, chat.KIND_TEACHER), chat.Turn((2,), ANSWER, chat.KIND_TEACHER),
     chat.Turn((6,), None, chat.KIND_STUDENT)],
])
def test_tokens_equal_apply_chat_template(tok, turns, language):
    t = chat.tokenize_conversation(tok, turns, language)
    open_turn = turns[-1].answer is None
    text = tok.apply_chat_template(chat.chat_messages(turns, language), tokenize=False,
                                   add_generation_prompt=open_turn)
    ref = tok(text, add_special_tokens=False)["input_ids"]
    counts = [n for turn in turns for n in turn.num_image_tokens]
    assert t.input_ids.tolist() == _expand(ref, tok.convert_tokens_to_ids("<|image_pad|>"), counts)

    # labels: exactly each assistant content + <|im_end|>, tagged by its turn's kind
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    kinds = t.supervised_kind
    runs = np.split(np.flatnonzero(kinds), np.flatnonzero(np.diff(np.flatnonzero(kinds)) > 1) + 1)
    answered = [turn for turn in turns if turn.answer is not None]
    assert len(runs) == len(answered) if kinds.any() else not answered
    for run, turn in zip(runs, answered):
        assert tok.decode(t.input_ids[run]) == turn.answer + "<|im_end|>"
        assert t.input_ids[run[-1]] == im_end and (kinds[run] == turn.kind).all()
        assert kinds[run[-1] + 1] == 0  # the "\n" after <|im_end|> is not supervised (documented)
    a, b = t.student_prompt_span
    assert tok.decode(t.input_ids[a:b]) == chat.INSTRUCTIONS[language]
    img_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert [int((t.input_ids[s:e] == img_pad).sum()) for s, e in t.image_spans] == counts
    assert t.student_image_spans == t.image_spans[-len(turns[-1].num_image_tokens):]


def test_caption_vocab(tmp_path, tok):
    f = tmp_path / "a.jsonl"
    ex = {"images": ["x.png"], "objects": [{"bbox_2d": [0, 0, 5, 5], "desc": "screw/loose"}]}
    f.write_text(json.dumps({"teachers": [dict(ex, objects=[{"bbox_2d": [0, 0, 5, 5], "desc": "光纤/接头"}])],
                             "student": ex}) + "\n")
    vocab = build_caption_vocab([str(f)], tok)
    want = set(tok("screw/loose", add_special_tokens=False)["input_ids"]) | set(
        tok("光纤/接头", add_special_tokens=False)["input_ids"]) | {tok.convert_tokens_to_ids("<|im_end|>")}
    assert vocab.dtype == np.int32 and vocab.tolist() == sorted(want)
    save_caption_vocab(str(tmp_path / "v.json"), vocab)
    np.testing.assert_array_equal(load_caption_vocab(str(tmp_path / "v.json")), vocab)
