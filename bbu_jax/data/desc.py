"""Object descriptions: normalization and the optional zh<->en mapping table.

A desc is a `/`-separated hierarchy type/part/status, e.g. `螺丝连接点/BBU安装螺丝/连接正确`.
Annotators type full-width punctuation and stray spaces; normalizing first makes one desc type
one string, which the teacher-pool cover, the summary and the caption vocabulary all count on.
"""
from __future__ import annotations

import json
import os
import unicodedata

# Full-width punctuation that NFKC leaves alone or that annotators use as a level separator.
_EXTRA = {"、": "/", "／": "/", "｜": "/", "|": "/", "，": ",", "。": ".", "：": ":", "；": ";",
          "（": "(", "）": ")", "【": "[", "】": "]", "“": '"', "”": '"', "‘": "'", "’": "'"}


def normalize_desc(desc: str) -> str:
    """Trim, map full-width to half-width (NFKC + a few CJK marks), join trimmed levels with `/`."""
    text = unicodedata.normalize("NFKC", desc)
    text = "".join(_EXTRA.get(ch, ch) for ch in text)
    levels = [" ".join(level.split()) for level in text.split("/")]
    return "/".join(level for level in levels if level)


def desc_levels(desc: str) -> list[str]:
    return desc.split("/")


class DescMap:
    """A zh<->en table of whole descs; `to(desc, language)` picks the wording.

    The table file is JSON `{"zh desc": "en desc", ...}`. Descs already in the wanted language pass
    through; a desc in neither column is returned unchanged (conversion counts these in its summary).
    """

    def __init__(self, zh_to_en: dict[str, str]):
        self.zh_to_en = {normalize_desc(k): normalize_desc(v) for k, v in zh_to_en.items()}
        self.en_to_zh = {v: k for k, v in self.zh_to_en.items()}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DescMap":
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
        if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in table.items()):
            raise ValueError(f"{path}: a desc map must be a JSON object of zh desc -> en desc strings")
        return cls(table)

    def to(self, desc: str, language: str) -> str | None:
        """The desc in `language` ('zh' or 'en'), or None when the table does not know it."""
        if language == "en":
            return desc if desc in self.en_to_zh else self.zh_to_en.get(desc)
        if language == "zh":
            return desc if desc in self.zh_to_en else self.en_to_zh.get(desc)
        raise ValueError(f"language must be 'zh' or 'en', got {language!r}")
