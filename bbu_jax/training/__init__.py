"""Training: config validation, optimizer groups, sharding, train state, the step, the loop,
checkpoints, logging; run.py turns a config into a run (scripts/train.py, scripts/demo.py)."""
