"""`make demo`: the whole pipeline on CPU in minutes, from nothing.

Creates the tiny model and the synthetic dataset (configs/demo.py), trains the LM and the
detection head together, evaluates on val, checkpoints, exports to HF, and prints where
everything is. Each run starts a fresh run folder (the model and data are reused).

  python scripts/demo.py [--config.num_train_steps=40 ...]
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from absl import app, logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "demo.py"), "demo config",
                                          lock_config=True)


def _lm_loss_curve(metrics_jsonl: pathlib.Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    return [(r["step"], r["train/lm_loss"]) for r in rows if "train/lm_loss" in r]


def main(argv) -> int:
    del argv
    import logging
    logging.getLogger().setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.WARNING)
    c = _CONFIG.value
    t0 = time.time()
    from bbu_jax.training import run
    from bbu_jax.training.config import validate
    import jax
    validate(c, device_count=jax.device_count())
    run.prepare_assets(c)
    run.check_budgets(c)
    workdir = pathlib.Path(c.workdir)
    if workdir.exists():
        print(f"removing the previous demo run {workdir}")
        shutil.rmtree(workdir)
    result = run.train(c)
    summary = json.loads((workdir / "summary.json").read_text())
    curve = _lm_loss_curve(workdir / "metrics.jsonl")
    print("\n=== bbu_jax demo ===")
    print(f"steps {result.step} ({result.stop_reason}) in {time.time() - t0:.0f}s")
    if curve:
        print(f"train/lm_loss: step {curve[0][0]} {curve[0][1]:.3f} -> step {curve[-1][0]} {curve[-1][1]:.3f}")
    for k in sorted(summary):
        if k.startswith("val/"):
            print(f"{k:28s} {summary[k]:.4f}")
    print(f"tiny model       {pathlib.Path(c.hf_dir).absolute()}")
    print(f"data             {pathlib.Path(c.train_jsonl).absolute().parent}")
    print(f"run folder       {workdir.absolute()}")
    print(f"tensorboard      tensorboard --logdir {workdir.absolute() / 'tensorboard'}")
    print(f"metrics          {workdir.absolute() / 'metrics.jsonl'}")
    print(f"summary          {workdir.absolute() / 'summary.json'}")
    print(f"last checkpoint  {summary['last_checkpoint']}")
    print(f"HF export        {summary['hf_export']}")
    return 0 if result.stop_reason == "done" else 2


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
