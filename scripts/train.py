"""Train Qwen2.5-VL + the detection head.

  python scripts/train.py --config configs/base.py --config.optim.llm_lr=1e-5
  python scripts/train.py --config configs/demo.py --validate_only     # config check, no model
  python scripts/train.py --config configs/base.py --print_config
  python scripts/train.py --config configs/demo.py --test_forward_pass # one batch, loss by term

Starts from config.model.hf_dir, or resumes from the newest readable checkpoint in
<run.workdir>/checkpoints (params, optimizer, step, RNG and the data position). Writes
<workdir>/{checkpoints/, tensorboard/, metrics.jsonl, summary.json, caption_vocab.json}.
Exit status: 0 done, 1 bad config/data, 2 stopped on repeated non-finite losses, 3 stopped by
SIGTERM/SIGINT after saving the current step (run again to resume there), 4 a checkpoint or the
logs could not be written (disk full; the earlier checkpoints are intact).
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
# stays on (it makes the single-device step faster). Must be set before jax is imported.
_FORCED = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
if _FORCED and int(_FORCED.group(1)) > 1:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

from bbu_jax.foundation.host_memory import keep_freed_memory  # noqa: E402
from bbu_jax.foundation.xla_flags import set_gpu_flags  # noqa: E402

keep_freed_memory()  # before jax starts its threads
set_gpu_flags()  # collectives overlapped with compute on GPU hosts; read when jax starts

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_VALIDATE_ONLY = flags.DEFINE_bool("validate_only", False, "run every check of the config, model folder and data, "
                                   "then exit")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the resolved config and exit")
_TEST_FORWARD = flags.DEFINE_bool("test_forward_pass", False, "one forward + loss on one batch, then exit")
_LOG_LEVEL = flags.DEFINE_enum("log_level", None, ["DEBUG", "INFO", "WARNING", "ERROR"],
                               "overrides config.run.log_level")

log = logging.getLogger("train")


def main(argv) -> int:
    del argv
    c = _CONFIG.value
    if _PRINT_CONFIG.value:
        print(c)
        return 0

    from bbu_jax.workflows.config import ConfigError, build_specs, validate
    try:
        # everything that needs no devices; the specs are built once jax.distributed has started
        # them (resolving the "auto" choices would start them first)
        validate(c)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    level = _LOG_LEVEL.value or c.run.log_level
    logging.getLogger().setLevel(level)  # absl.app installed the handler on the root logger
    # orbax and grain log every file operation at INFO through absl: keep them to warnings.
    logging.getLogger("absl").setLevel(max(logging.getLevelName(level), logging.WARNING))

    import jax
    if c.mesh.distributed:
        m = c.mesh
        jax.distributed.initialize(coordinator_address=m.coordinator_address or None,
                                   num_processes=m.num_processes or None,
                                   process_id=None if m.process_id < 0 else m.process_id)
    from bbu_jax.workflows import data_checks, demo_assets, train
    try:
        specs = build_specs(c, device_count=jax.device_count())
        demo_assets.prepare_assets(specs)
        encoder = train.make_encoder(specs)  # one tokenizer load for the checks and the run
        data_checks.check_data(specs, encoder)
    except (ConfigError, ValueError, OSError) as e:
        print(e, file=sys.stderr)
        return 1
    if _VALIDATE_ONLY.value:
        print(f"config OK ({jax.device_count()} devices)")
        return 0
    if _TEST_FORWARD.value:
        train.test_forward_pass(specs, encoder)
        return 0
    from bbu_jax.training.loop import EXIT_STATUS
    return EXIT_STATUS[train.train(specs, encoder).stop_reason]


if __name__ == "__main__":
    from bbu_jax.workflows.config import run_config_script
    run_config_script(main)
