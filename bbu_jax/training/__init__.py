"""Training library: optimizer groups (OptimSpec), the task (ModelSpec: model + head + loss), the
train state, the jitted step, the loop (LoopSpec), checkpoints, logging. workflows.train puts them
together into a run."""
