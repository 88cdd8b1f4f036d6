"""Train Qwen2.5-VL + the detection head.

  python scripts/train.py --config configs/base.py --config.llm_lr=1e-5
  python scripts/train.py --config configs/demo.py --validate_only     # config check, no model
  python scripts/train.py --config configs/base.py --print_config
  python scripts/train.py --config configs/demo.py --test_forward_pass # one batch, loss by term

Starts from config.hf_dir, or resumes from the newest readable checkpoint in
<workdir>/checkpoints (params, optimizer, step, RNG and the data position). Writes
<workdir>/{checkpoints/, tensorboard/, metrics.jsonl, summary.json, caption_vocab.json}.
Exit status: 0 done, 1 bad config/data, 2 stopped on repeated non-finite losses.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# XLA:CPU's concurrency-optimized scheduler can order the collectives of different devices
# differently and deadlock a multi-device CPU step (seen with the detection head on a 2x2x2 mesh of
# fake CPU devices), so it is turned off where several CPU devices share the process; with one it
# stays on (the step is ~5% faster with it). Must be set before jax is imported.
_FORCED = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
if _FORCED and int(_FORCED.group(1)) > 1:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

from bbu_jax.foundation.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # before jax starts its threads

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_VALIDATE_ONLY = flags.DEFINE_bool("validate_only", False, "check the config (and data budgets) and exit")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the resolved config and exit")
_TEST_FORWARD = flags.DEFINE_bool("test_forward_pass", False, "one forward + loss on one batch, then exit")
_LOG_LEVEL = flags.DEFINE_enum("log_level", None, ["DEBUG", "INFO", "WARNING", "ERROR"],
                               "overrides config.log_level")

log = logging.getLogger("train")


def main(argv) -> int:
    del argv
    c = _CONFIG.value
    level = _LOG_LEVEL.value or c.log_level
    logging.getLogger().setLevel(level)  # absl.app installed the handler on the root logger
    # orbax and grain log every file operation at INFO through absl: keep them to warnings.
    logging.getLogger("absl").setLevel(max(logging.getLevelName(level), logging.WARNING))
    if _PRINT_CONFIG.value:
        print(c)
        return 0

    from bbu_jax.training.config import ConfigError, validate
    try:
        validate(c)  # everything that needs no devices
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1

    import jax
    if c.distributed:
        jax.distributed.initialize(coordinator_address=c.coordinator_address or None,
                                   num_processes=c.num_processes or None,
                                   process_id=None if c.process_id < 0 else c.process_id)
    from bbu_jax.workflows import train as run
    try:
        validate(c, device_count=jax.device_count())
        run.prepare_assets(c)
        if c.check_budgets_on_start:
            run.check_budgets(c)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(e, file=sys.stderr)
        return 1
    if _VALIDATE_ONLY.value:
        print(f"config OK ({jax.device_count()} devices)")
        return 0
    if _TEST_FORWARD.value:
        run.test_forward_pass(c)
        return 0
    return 2 if run.train(c).stop_reason == "nonfinite" else 0


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(lambda argv: sys.exit(main(argv)))
