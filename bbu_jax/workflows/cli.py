"""The command-line flags the inference scripts share: one name and one default per setting."""
from __future__ import annotations

import argparse

from bbu_jax.data.chat import LANGUAGES
from bbu_jax.inference import Predictor
from bbu_jax.models.attention import IMPLEMENTATIONS
from bbu_jax.training.task import DTYPES

TRAINED = "default: as trained"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module doc as written, and each flag's default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not any(action.default is x for x in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags infer.py and evaluate.py share (same names, same defaults)."""
    p.add_argument("--model", required=True, help="HF export folder, run folder or RUN/checkpoints/STEP")
    p.add_argument("--data", required=True, help="JSONL of records to answer")
    p.add_argument("--max_samples", type=int, default=None, help="only the first N records (default: all)")
    p.add_argument("--num_teachers", type=int, default=None, help=f"demonstrations per prompt ({TRAINED})")
    p.add_argument("--teacher_pool", default=None, help=f"JSONL whose students serve as demonstrations ({TRAINED})")
    p.add_argument("--language", choices=LANGUAGES, default=None, help=TRAINED)
    p.add_argument("--min_pixels", type=int, default=None, help=TRAINED)
    p.add_argument("--max_pixels", type=int, default=None, help=TRAINED)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="params and compute (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--attention_impl", choices=IMPLEMENTATIONS, default=None,
                   help="default: the fused kernel on GPU, xla on CPU")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per generation call")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="longest generated answer, tokens")
    p.add_argument("--skip_bad_samples", action="store_true", help="skip and count bad records")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def load_predictor(args):
    """The Predictor the flags describe (settings from the model, flags as overrides)."""
    return Predictor.from_pretrained(args.model, dtype=args.dtype, attention_impl=args.attention_impl,
                                     language=args.language, min_pixels=args.min_pixels,
                                     max_pixels=args.max_pixels, num_teachers=args.num_teachers,
                                     teacher_pool=args.teacher_pool)
