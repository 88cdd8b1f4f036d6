"""Parse the model's grounding answer into objects, whatever the model wrote.

The trained answer is Qwen2.5-VL's native grounding JSON in a fence:

    ```json
    [{"bbox_2d": [x1, y1, x2, y2], "desc": "type/part/status"}, ...]
    ```

with absolute pixel coordinates of the *resized* image the model saw. Generation can stop at
``max_new_tokens`` mid-object, the model may drop the fence, write ``bbox``/``label`` (the base
model's keys) or emit nonsense boxes. ``parse_response`` keeps every complete, valid object, maps
boxes back to original-image pixels and reports what it dropped and why. It never raises on any
text: an evaluation over thousands of answers must not die on one.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Any

# Status codes. "ok": the answer was read whole. "truncated": the text ends inside the answer
# (generation stopped); the complete objects before the cut are kept. "malformed": something that
# is not JSON interrupted the answer after at least one object; the objects before it are kept.
# "empty": blank text or an empty list. "no_json": no answer found (a parse failure).
OK, TRUNCATED, MALFORMED, EMPTY, NO_JSON = "ok", "truncated", "malformed", "empty", "no_json"

BOX_KEYS = ("bbox_2d", "bbox")
DESC_KEYS = ("desc", "label")

# Only the first few '[' / '{' are tried as the start of the answer: prose before unfenced JSON
# rarely holds more brackets, and a bounded count keeps the work linear in the text length.
_MAX_START_CANDIDATES = 8
_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?", re.IGNORECASE)
_DECODER = json.JSONDecoder()
_SPACE = " \t\r\n"


@dataclasses.dataclass
class ParseStatus:
    """What happened while parsing one answer.

    Attributes:
      code: ok / truncated / malformed / empty / no_json (see the module constants).
      num_objects: objects returned.
      dropped: reason -> count of candidate objects rejected (e.g. "degenerate_box").
    """

    code: str
    num_objects: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def failed(self) -> bool:
        """True when no answer could be found at all (a parse failure)."""
        return self.code == NO_JSON

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "num_objects": self.num_objects, "dropped": dict(self.dropped)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParseStatus":
        """Inverse of ``to_dict`` (a predictions file stores statuses as JSON)."""
        dropped = {k: int(v) for k, v in d.get("dropped", {}).items()}
        return cls(d["code"], int(d.get("num_objects", 0)), dropped)


def parse_response(
    text: Any,
    resized_hw: tuple[int, int] | None = None,
    original_hw: tuple[int, int] | None = None,
) -> tuple[list[dict[str, Any]], ParseStatus]:
    """Objects ``{"bbox_2d": [x1, y1, x2, y2], "desc": str}`` from a model answer, plus a status.

    Args:
      text: the generated answer; anything that is not a str is a parse failure.
      resized_hw: (height, width) of the image the model saw; boxes are read in this frame and
        clamped to it.
      original_hw: (height, width) of the original image. With both sizes, boxes are scaled from
        the resized frame to original pixels; with one, boxes are only clamped to it.

    Returns:
      (objects, status). Box coordinates are floats. A box is clamped into the image and dropped
      when it has the wrong length, a non-numeric or non-finite coordinate, x2 <= x1 or y2 <= y1,
      or lies wholly outside the image. Accepted keys: bbox_2d or bbox, desc or label.

    Raises:
      ValueError: only for a non-positive image size (a caller bug, not a model answer).
    """
    for hw in (resized_hw, original_hw):
        if hw is not None and (len(hw) != 2 or min(hw) <= 0):
            raise ValueError(f"image size must be (height, width) > 0, got {hw}")
    if not isinstance(text, str):
        return [], ParseStatus(NO_JSON)
    items, code = _extract_items(text)
    frame_hw = resized_hw if resized_hw is not None else original_hw
    scale = None
    if resized_hw is not None and original_hw is not None:
        scale = (original_hw[0] / resized_hw[0], original_hw[1] / resized_hw[1])
    dropped: collections.Counter[str] = collections.Counter()
    objects = []
    for item in items:
        obj, reason = _validate(item, frame_hw, scale)
        if obj is None:
            dropped[reason] += 1
        else:
            objects.append(obj)
    return objects, ParseStatus(code, len(objects), dict(dropped))


def _extract_items(text: str) -> tuple[list[Any], str]:
    """Raw JSON items of the answer (not yet validated) and a status code."""
    fence = _FENCE.search(text)
    body = fence.end() if fence else 0
    # Inside the fence first; then before it, for an unfenced answer followed by a stray fence.
    starts = [body + m.start() for m in re.finditer(r"[\[{]", text[body:])]
    starts += [m.start() for m in re.finditer(r"[\[{]", text[:body])]
    for start in starts[:_MAX_START_CANDIDATES]:
        items, code = _items_from(text, start)
        # Anything but no_json is the answer, even without items (a list cut before its first
        # object closed): later candidates lie inside it.
        if code != NO_JSON:
            return items, code
    if not _FENCE.sub("", text).strip(_SPACE + "`"):
        return [], EMPTY
    return [], NO_JSON


def _items_from(text: str, start: int) -> tuple[list[Any], str]:
    """Items of the list or object sequence starting at ``text[start]`` ('[' or '{')."""
    value, _, err = _decode(text, start)
    if err is None:
        if isinstance(value, list):
            if not value:
                return [], EMPTY
            return (value, OK) if any(isinstance(v, dict) for v in value) else ([], NO_JSON)
        if _is_bare_object(value):
            return _object_sequence(text, start)
        for v in value.values() if isinstance(value, dict) else ():  # e.g. {"objects": [...]}
            if isinstance(v, list) and any(isinstance(x, dict) for x in v):
                return v, OK
        return [], NO_JSON
    if text[start] == "[":
        return _scan_list(text, start + 1)
    return _object_sequence(text, start)


def _scan_list(text: str, pos: int) -> tuple[list[Any], str]:
    """Complete objects of a list that does not parse as a whole (cut off or interrupted)."""
    items: list[Any] = []
    while True:
        pos = _skip_separators(text, pos)
        if pos >= len(text):
            return items, TRUNCATED
        if text[pos] == "]":  # closed; only a trailing comma kept it from parsing
            return items, OK if items else EMPTY
        if text[pos] != "{":
            return items, MALFORMED if items else NO_JSON
        item, pos, err = _decode(text, pos)
        if err is not None:
            return items, err if (items or err == TRUNCATED) else NO_JSON
        items.append(item)


def _object_sequence(text: str, pos: int) -> tuple[list[Any], str]:
    """Bare objects one after another (``{...}\\n{...}`` or ``{...}, {...}``) without a list."""
    items: list[Any] = []
    while True:
        pos = _skip_separators(text, pos)
        if pos >= len(text) or text[pos] != "{":
            return items, OK if items else NO_JSON
        item, pos, err = _decode(text, pos)
        if err is not None:
            return items, err if (items or err == TRUNCATED) else NO_JSON
        items.append(item)


def _skip_separators(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _SPACE + ",":
        pos += 1
    return pos


def _decode(text: str, pos: int) -> tuple[Any, int, str | None]:
    """(value, end, None) for the JSON value at ``pos``, else (None, pos, TRUNCATED|MALFORMED).

    A value is cut (truncated) when the decoder ran into the end of the text, or met a string
    that never closes — the text after an unterminated quote is all part of it.
    """
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        cut = e.pos >= len(text.rstrip(_SPACE)) or e.msg.startswith("Unterminated string")
        return None, pos, TRUNCATED if cut else MALFORMED
    except (ValueError, RecursionError):  # e.g. an integer too long to convert, deep nesting
        return None, pos, MALFORMED
    return value, end, None


def _is_bare_object(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in BOX_KEYS + DESC_KEYS)


def _validate(item: Any, frame_hw, scale) -> tuple[dict[str, Any] | None, str]:
    """A clean object, or (None, why it was dropped)."""
    if not isinstance(item, dict):
        return None, "not_an_object"
    box = next((item[k] for k in BOX_KEYS if k in item), None)
    desc = next((item[k] for k in DESC_KEYS if k in item), None)
    if box is None:
        return None, "missing_box"
    if desc is None:
        return None, "missing_desc"
    if not isinstance(desc, str) or not desc.strip():
        return None, "bad_desc"
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None, "bad_box_length"
    coords = [_as_float(v) for v in box]
    if any(c is None for c in coords):
        return None, "non_numeric_box"
    x1, y1, x2, y2 = coords
    if x2 <= x1 or y2 <= y1:
        return None, "degenerate_box"
    x1, y1 = max(x1, 0.0), max(y1, 0.0)
    if frame_hw is not None:
        h, w = frame_hw
        x2, y2 = min(x2, float(w)), min(y2, float(h))
    if x2 <= x1 or y2 <= y1:
        return None, "out_of_bounds"
    if scale is not None:
        sy, sx = scale
        x1, y1, x2, y2 = x1 * sx, y1 * sy, x2 * sx, y2 * sy
    return {"bbox_2d": [x1, y1, x2, y2], "desc": desc.strip()}, ""


def _as_float(v: Any) -> float | None:
    """A finite float for a JSON number; None for bools, strings, NaN, inf or overflow."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None
