"""Response parser: never raises, keeps every complete object, converts and validates boxes."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bbu_jax.data.chat import format_answer
from bbu_jax.inference.parser import (EMPTY, MALFORMED, NO_JSON, OK, TRUNCATED, ParseStatus,
                                      parse_response)

H, W = 480, 640  # the resized frame the answers are written in

descs = st.text(alphabet=st.sampled_from(list("abcXYZ 01/_-\"\\}]{[,:螺丝连接点正确")), min_size=1,
                max_size=12).filter(lambda s: s.strip())


@st.composite
def objects(draw, max_size=6):
    """Valid objects as the data pipeline writes them: integer pixels inside the image."""
    out = []
    for _ in range(draw(st.integers(0, max_size))):
        x1 = draw(st.integers(0, W - 1))
        y1 = draw(st.integers(0, H - 1))
        x2 = draw(st.integers(x1 + 1, W))
        y2 = draw(st.integers(y1 + 1, H))
        out.append({"bbox_2d": [x1, y1, x2, y2], "desc": draw(descs).strip()})
    return out


def fmt(objs, style):
    """The answer text in several plausible layouts (the training format is 'spaced')."""
    if style == "spaced":
        body = json.dumps(objs, ensure_ascii=False)
    elif style == "compact":
        body = json.dumps(objs, ensure_ascii=False, separators=(",", ":"))
    elif style == "indented":
        body = json.dumps(objs, ensure_ascii=False, indent=2)
    else:  # ascii escapes
        body = json.dumps(objs)
    return f"```json\n{body}\n```"


def as_float(objs):
    return [{"bbox_2d": [float(v) for v in o["bbox_2d"]], "desc": o["desc"]} for o in objs]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.text(alphabet=st.sampled_from(list('[]{}",:0123456789.-eE `json\nabc')))),
       st.sampled_from([None, (H, W)]))
def test_arbitrary_text_never_raises(text, hw):
    objs, status = parse_response(text, resized_hw=hw, original_hw=hw)
    assert status.code in (OK, TRUNCATED, MALFORMED, EMPTY, NO_JSON)
    assert status.num_objects == len(objs)
    for o in objs:
        x1, y1, x2, y2 = o["bbox_2d"]
        assert x1 < x2 and y1 < y2 and isinstance(o["desc"], str)


def test_non_string_inputs_are_parse_failures():
    for bad in (None, 3, b"[]", ["x"]):
        objs, status = parse_response(bad)
        assert objs == [] and status.failed


@settings(max_examples=100)
@given(objects(), st.sampled_from(["spaced", "compact", "indented", "ascii"]))
def test_round_trip_training_format(objs, style):
    got, status = parse_response(fmt(objs, style), resized_hw=(H, W), original_hw=(H, W))
    assert got == as_float(objs)
    assert status.code == (OK if objs else EMPTY)
    assert status.num_dropped == 0


@settings(max_examples=100)
@given(objects())
def test_round_trip_data_pipeline_answer(objs):
    """The exact answer text training supervises parses back to the same objects."""
    text = format_answer([(o["bbox_2d"], o["desc"]) for o in objs])
    got, status = parse_response(text, resized_hw=(H, W), original_hw=(H, W))
    key = lambda o: (o["bbox_2d"], o["desc"])  # noqa: E731 (format_answer sorts the objects)
    assert sorted(got, key=key) == sorted(as_float(objs), key=key)
    assert status.code == (OK if objs else EMPTY) and status.num_dropped == 0


@settings(max_examples=40, deadline=None)
@given(objects(max_size=4))
def test_truncation_at_every_position_keeps_complete_objects(objs):
    text = fmt(objs, "spaced")
    body_start = text.index("[")
    # End offset of each object's closing brace within the text.
    ends, pos = [], body_start + 1
    for o in objs:
        piece = json.dumps(o, ensure_ascii=False)
        start = text.index(piece, pos)
        ends.append(start + len(piece))
        pos = ends[-1]
    for cut in range(len(text) + 1):
        got, status = parse_response(text[:cut], resized_hw=(H, W))
        complete = [o for o, end in zip(objs, ends) if end <= cut]
        assert got == as_float(complete), (cut, text[:cut])
        list_closed = cut > text.rindex("]")
        if not list_closed and cut > body_start and objs:
            assert status.code == TRUNCATED, (cut, status)


@settings(max_examples=60)
@given(objects(max_size=4), st.data())
def test_swapped_and_alternative_keys(objs, data):
    """Key order and the base model's key names (bbox, label) do not matter."""
    mangled = []
    for o in objs:
        box_key = data.draw(st.sampled_from(["bbox_2d", "bbox"]))
        desc_key = data.draw(st.sampled_from(["desc", "label"]))
        pairs = [(box_key, o["bbox_2d"]), (desc_key, o["desc"])]
        if data.draw(st.booleans()):
            pairs.reverse()
        mangled.append(dict(pairs))
    fenced = data.draw(st.booleans())
    body = json.dumps(mangled, ensure_ascii=False)
    got, _ = parse_response(f"```json\n{body}\n```" if fenced else body)
    assert got == as_float(objs)


def test_converts_resized_pixels_to_original():
    text = '```json\n[{"bbox_2d": [10, 20, 110, 220], "desc": "a/b/c"}]\n```'
    got, status = parse_response(text, resized_hw=(280, 420), original_hw=(560, 1260))
    assert status.code == OK
    assert got == [{"bbox_2d": [30.0, 40.0, 330.0, 440.0], "desc": "a/b/c"}]


def test_invalid_boxes_are_dropped_with_reasons():
    items = [
        {"bbox_2d": [1, 2, 3], "desc": "short"},
        {"bbox_2d": [1, "2", 3, 4], "desc": "string coordinate"},
        {"bbox_2d": [1, 2, 3, True], "desc": "bool coordinate"},
        {"bbox_2d": [5, 5, 5, 9], "desc": "zero width"},
        {"bbox_2d": [9, 5, 1, 9], "desc": "inverted"},
        {"bbox_2d": [700, 10, 800, 20], "desc": "right of the image"},
        {"bbox_2d": [-10, -10, 50, 60], "desc": "clamped"},
        {"bbox_2d": [1, 2, 3, 4]},
        {"desc": "no box"},
        {"bbox_2d": [1, 2, 3, 4], "desc": 7},
        "not an object",
        {"bbox_2d": [1, 2, 3, 4], "desc": "kept"},
    ]
    text = json.dumps(items) + '\n{"bbox_2d": [1, 2, 3, 1e999], "desc": "inf"}'
    got, status = parse_response(text, resized_hw=(H, W))
    assert got == [{"bbox_2d": [0.0, 0.0, 50.0, 60.0], "desc": "clamped"},
                   {"bbox_2d": [1.0, 2.0, 3.0, 4.0], "desc": "kept"}]
    assert status.code == OK
    assert status.dropped == {"bad_box_length": 1, "non_numeric_box": 2, "degenerate_box": 2,
                              "out_of_bounds": 1, "missing_desc": 1, "missing_box": 1,
                              "bad_desc": 1, "not_an_object": 1}


@pytest.mark.parametrize("text, code, n", [
    ("", EMPTY, 0),
    ("```json\n[]\n```", EMPTY, 0),
    ("I see no BBU here.", NO_JSON, 0),
    ("[1, 2, 3]", NO_JSON, 0),
    ('Sure! [{"bbox_2d": [1, 2, 3, 4], "desc": "a"}] done', OK, 1),
    ('{"bbox_2d": [1, 2, 3, 4], "desc": "a"}\n{"bbox_2d": [5, 6, 7, 8], "desc": "b"}', OK, 2),
    ('{"objects": [{"bbox_2d": [1, 2, 3, 4], "desc": "a"}]}', OK, 1),
    ('[{"bbox_2d": [1, 2, 3, 4], "desc": "a"},]', OK, 1),
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "desc": "a"}, oops]\n```', MALFORMED, 1),
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "desc": "a"}, {"bbox_2d": [5, 6', TRUNCATED, 1),
    ('```json\n[{"bbox_2d": [1, 2, 3, 4], "desc": "unfinish', TRUNCATED, 0),
    ("[" * 100000, NO_JSON, 0),
])
def test_status_codes(text, code, n):
    got, status = parse_response(text)
    assert (status.code, len(got)) == (code, n)
    assert status.failed == (code == NO_JSON)


def test_status_survives_json():
    _, status = parse_response('[{"bbox_2d": [1, 2, 3], "desc": "a"}, {"bbox_2d": [1, 2, 3, 4], "desc": "b"}')
    assert status.code == TRUNCATED and status.dropped == {"bad_box_length": 1}
    assert ParseStatus.from_dict(json.loads(json.dumps(status.to_dict()))) == status


def test_bad_image_size_is_a_caller_error():
    with pytest.raises(ValueError, match="image size"):
        parse_response("[]", resized_hw=(0, 10))
