"""The settings a trained model is used with, recorded by the run beside its weights.

A model fine-tuned at 224x224 pixels on English answers after one demonstration answers badly at
another resolution, in another language or with another prompt, and nothing in the weights says
which were used. So every checkpoint step (its JSON item) and every export (``SETTINGS_FILE``)
carries one `Settings` record: the image limits, the answer language and prompt texts, the
demonstrations, the caption vocabulary and head architecture, the model config, every spec of the
run, the training data's conversion parameters and the package versions. Inference reads it and
defaults every setting from it (`bbu_jax.inference.predictor`); an explicit override that
contradicts it is reported (`overrides`).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bbu_jax.data.encode import SampleEncoder
from bbu_jax.foundation.files import write_json_atomic
from bbu_jax.losses import LossSpec, LossWeights, MatchCost
from bbu_jax.losses.matcher import resolve_matcher
from bbu_jax.models.detection_head import HeadSpec

FORMAT = "bbu_jax.settings"
SETTINGS_FILE = "bbu_jax_settings.json"
# Distributions whose versions a record names: a result is reproduced with the same ones.
PACKAGES = ("bbu_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "numpy")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclasses.dataclass(frozen=True)
class Settings:
    """What using a trained model as it was trained needs (see the module doc)."""
    base_model: str  # the HF folder training started from (absolute): tokenizer and processor files
    model_config: dict[str, Any]  # the trained model's HF config.json
    language: str
    min_pixels: int
    max_pixels: int
    system_prompt: str
    instruction: str  # the user text before every answer
    num_teachers: int  # demonstrations per prompt that match how training mostly saw samples
    teacher_pool: str  # absolute path of the training's teacher pool JSONL ("" none)
    caption_vocab: list[int] | None  # token ids the head's caption decoder scores (None: no head)
    head: dict[str, Any] | None  # {"llm_hidden": int, **HeadSpec fields} (None: no head)
    specs: dict[str, Any]  # every spec of the run (dataclasses.asdict of workflows.config.Specs)
    training_data: dict[str, Any] | None  # the "params" of the train data's summary.json (conversion)
    versions: dict[str, str]
    step: int | None = None  # the optimizer step of these weights

    # ------------------------------------------------------------------ reading and writing
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> "Settings":
        """Errors name ``source`` (the file or checkpoint the record came from)."""
        if d.get("format") != FORMAT:
            raise ValueError(f"{source}: not a bbu_jax settings record (format {d.get('format')!r}, "
                             f"expected {FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if missing := sorted(required - set(d)):
            raise ValueError(f"{source}: settings record lacks {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / SETTINGS_FILE
        write_json_atomic(path, self.to_dict(), indent=2)
        return path

    @classmethod
    def read(cls, folder: str | Path) -> "Settings":
        path = Path(folder) / SETTINGS_FILE
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        return cls.from_dict(d, str(path))

    def at_step(self, step: int) -> "Settings":
        return dataclasses.replace(self, step=int(step))

    # ------------------------------------------------------------------ what they build
    def head_spec(self) -> HeadSpec | None:
        if self.head is None:
            return None
        return HeadSpec(**{k: v for k, v in self.head.items() if k != "llm_hidden"})

    def loss_spec(self) -> LossSpec:
        """The run's loss weights: a val loss total means what it meant in training. The matcher is
        this machine's ("auto"), not the recorded one: both are exact, only their cost differs."""
        loss = self.specs["loss"]
        weights = dict(loss["weights"])
        weights["match"] = MatchCost(**weights["match"])
        return LossSpec(**{**loss, "weights": LossWeights(**weights),
                           "matcher": resolve_matcher("auto", jax.default_backend())})

    def caption_vocab_array(self) -> np.ndarray | None:
        return None if self.caption_vocab is None else np.asarray(self.caption_vocab, np.int32)

    def encoder(self, tokenizer_dir: str | Path, *, language: str | None = None, min_pixels: int | None = None,
                max_pixels: int | None = None) -> SampleEncoder:
        """The sample encoder of training; an override replaces the recorded value (and another
        language's instruction replaces the recorded one)."""
        lang = language or self.language
        return SampleEncoder(str(tokenizer_dir), min_pixels=min_pixels or self.min_pixels,
                             max_pixels=max_pixels or self.max_pixels, language=lang,
                             system_prompt=self.system_prompt,
                             instruction=self.instruction if lang == self.language else None)

    def overrides(self, given: Mapping[str, Any]) -> list[str]:
        """One line per given value (None: not given) that differs from the trained one."""
        return [f"{k} {v!r} differs from the trained {k} {getattr(self, k)!r}: the model was not trained "
                f"for it" for k, v in given.items() if v is not None and v != getattr(self, k)]
