"""Plan the batch budgets from the training data: the patch budget and segments per row that fill
the configured rows (data.batch_rows x data.token_budget) with real tokens and patches.

  python scripts/plan_budgets.py --config configs/base.py
  python scripts/plan_budgets.py --config configs/base.py --config.data.pack_buffer=512 --max_samples 2000

Draws samples from data.train_jsonl exactly as training does (run.seed, shuffle, teacher sampling
from data.teacher_pool_jsonl, the model folder's tokenizer and pixel limits), simulates the
loader's packer on their sizes (bbu_jax.data.budgets) and prints the budgets with the fill they
give, and the overrides that set them. Put them in the config: the jitted step compiles for one
set of budgets for the whole run.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_MAX_SAMPLES = flags.DEFINE_integer("max_samples", 1000, "samples drawn to plan from (at most one epoch)")
_WORKERS = flags.DEFINE_integer("workers", None, "grain workers drawing them (default: data.workers)")


def main(argv) -> int:
    del argv
    from bbu_jax.data.budgets import describe, plan_for_spec
    from bbu_jax.workflows.config import ConfigError, build_specs
    from bbu_jax.workflows.train import make_encoder
    try:
        specs = build_specs(_CONFIG.value, platform="cpu")  # host-side planning: starts no GPU backend
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    workers = specs.data.workers if _WORKERS.value is None else _WORKERS.value
    try:
        plan, sizes = plan_for_spec(specs.data, make_encoder(specs), seed=specs.run.seed,
                                    max_samples=_MAX_SAMPLES.value, workers=workers)
    except (ValueError, OSError) as e:
        print(e, file=sys.stderr)
        return 1
    print(describe(plan, sizes))
    return 0


if __name__ == "__main__":
    from bbu_jax.workflows.config import run_config_script
    run_config_script(main)
