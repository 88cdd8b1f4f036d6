"""Inference: generation, parsing, the detection head's predictions, and `Predictor` over them."""


def __getattr__(name: str):
    # Lazy: `from bbu_jax.inference import Predictor` loads the checkpoint readers, the submodules
    # (generate, parser, predict) do not need them.
    if name == "Predictor":
        from bbu_jax.inference.predictor import Predictor
        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
