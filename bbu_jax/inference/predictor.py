"""`Predictor`: a trained model used as it was trained, in a few lines.

    p = Predictor.from_pretrained("./runs/bbu/hf_export") # or the run folder, or checkpoints/STEP
    p.detect(["photo.jpg", pil_image, array])             # the detection head, one forward each
    p.generate(["photo.jpg"])                             # the model's JSON answer, parsed

Every setting (language and prompt, pixel limits, demonstrations, caption vocabulary) comes from
the settings the run recorded beside the weights; an override that contradicts them is reported
once as a warning. Images are file paths (turned upright by their EXIF orientation), PIL images or
H x W x 3 uint8 arrays, in any mix; boxes come back in pixels of the image as given. Prompts of
similar size share one compilation (lengths and patch counts are rounded up to buckets).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from bbu_jax.data.chat import LANGUAGES
from bbu_jax.data.encode import SampleEncoder
from bbu_jax.data.schema import Example, Record, load_records
from bbu_jax.inference.answers import answer_prompts, build_prompts
from bbu_jax.inference.loading import Trained, load_trained
from bbu_jax.inference.predict import predict_detection
from bbu_jax.models.qwen2_5_vl.processing import ImageInput, read_pixel_limits

log = logging.getLogger(__name__)


class Predictor:
    def __init__(self, trained: Trained, encoder: SampleEncoder, *, num_teachers: int, teacher_pool: str):
        self.trained, self.encoder = trained, encoder
        self.num_teachers, self.teacher_pool = num_teachers, teacher_pool
        self._pools: dict[str, list[Example]] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str | None = None, attention_impl: str | None = None,
                        language: str | None = None, min_pixels: int | None = None,
                        max_pixels: int | None = None, num_teachers: int | None = None,
                        teacher_pool: str | None = None) -> "Predictor":
        """``path``: an HF export folder, a run folder (its newest readable checkpoint) or one
        checkpoint step. ``dtype``/``attention_impl`` default to bfloat16 and the fused kernel on
        GPU, float32 and XLA's attention on the CPU. The other arguments override the trained
        settings (each difference is logged as a warning)."""
        if language is not None and language not in LANGUAGES:
            raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
        if teacher_pool and not Path(teacher_pool).is_file():
            raise FileNotFoundError(f"{teacher_pool}: no such teacher pool")
        trained = load_trained(path, dtype=dtype, attention_impl=attention_impl)
        settings = trained.settings
        given = {"language": language, "min_pixels": min_pixels, "max_pixels": max_pixels}
        if settings is None:  # an HF folder not trained by bbu_jax: its processor's limits
            low, high = read_pixel_limits(trained.files)
            log.warning("%s records no bbu_jax settings: using its processor's pixel limits %d..%d and "
                        "language %r", path, low, high, language or "zh")
            encoder = SampleEncoder(str(trained.files), min_pixels=min_pixels or low, max_pixels=max_pixels or high,
                                    language=language or "zh")
            return cls(trained, encoder, num_teachers=num_teachers or 0, teacher_pool=teacher_pool or "")
        for line in settings.overrides({**given, "num_teachers": num_teachers}):
            log.warning("%s", line)
        encoder = settings.encoder(trained.files, **given)
        return cls(trained, encoder, num_teachers=settings.num_teachers if num_teachers is None else num_teachers,
                   teacher_pool=settings.teacher_pool if teacher_pool is None else teacher_pool)

    @property
    def model(self):
        return self.trained.model

    @property
    def head(self):
        return self.trained.head

    def demonstrations(self, num_teachers: int, teacher_pool: str | None = None) -> list[Example]:
        """The pool demonstrations are drawn from: ``teacher_pool`` (a JSONL), by default the one
        given to from_pretrained or the training's, when it is still there (else none, with a
        warning); read once per file."""
        path = self.teacher_pool if teacher_pool is None else teacher_pool
        if not num_teachers or not path:
            return []
        if not Path(path).is_file():
            if teacher_pool is not None:
                raise FileNotFoundError(f"{path}: no such teacher pool")
            log.warning("the teacher pool %s is gone: prompts without their own demonstrations get none", path)
            self.teacher_pool = ""
            return []
        if path not in self._pools:
            records, _ = load_records(path)
            self._pools[path] = [r.student for r in records]
        return self._pools[path]

    def detect(self, images: Sequence[ImageInput], *, score_threshold: float = 0.3, top_k: int = 100,
               batch_size: int = 4) -> list[list[dict]]:
        """Per image, the head's detections best first: [{"bbox_2d": [x1, y1, x2, y2], "desc", "score"}]."""
        if self.head is None:
            raise ValueError(f"{self.trained.source} has no detection head: use generate()")
        dets = predict_detection(self.model, self.head, list(images), encoder=self.encoder,
                                 caption_vocab=self.trained.caption_vocab, score_threshold=score_threshold,
                                 top_k=top_k, batch_size=batch_size)
        return [[{"bbox_2d": [float(v) for v in box], "desc": desc, "score": float(score)}
                 for box, score, desc in zip(d.boxes, d.scores, d.captions)] for d in dets]

    def generate(self, images: Sequence[ImageInput], *, num_teachers: int | None = None,
                 teacher_pool: str | None = None, max_new_tokens: int = 1024, batch_size: int = 8,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[dict]:
        """Per image, the generated answer: {"objects": [{"bbox_2d", "desc"}], "text", "parse_status"}.

        ``num_teachers`` demonstrations (default: as trained) are drawn with ``seed`` from
        ``teacher_pool`` (default: the training's pool, when it is still there)."""
        num_teachers = self.num_teachers if num_teachers is None else num_teachers
        records = [Record(Example((image,), ()), None, f"image {i}", str(i)) for i, image in enumerate(images)]
        prompts, _ = build_prompts(self.encoder, records, self.demonstrations(num_teachers, teacher_pool),
                                   num_teachers=num_teachers, seed=seed)
        results = answer_prompts(self.model, self.encoder.tokenizer, [p for _, p in prompts],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
                                 top_p=top_p, seed=seed, progress=False)
        return [{"objects": pred, "text": text, "parse_status": status.to_dict()} for text, pred, status in results]

