"""Runs the real training loop (checkpoints, grain iterator state, logging) on the toy task in a
separate process: for the SIGKILL/SIGTERM-resume and multi-process tests.

  python tests/training_driver.py --workdir W --steps 6 [--kill_after 3] [--pause_at 2]
      [--num_processes 2 --process_id 0 --coordinator localhost:PORT] [--local_devices 4 --mesh 2,2,2]

Exits 3 when a signal stopped the loop (as scripts/train.py does); writes W/final_params.npz.
`start` and `wait` run it from a test.

  python tests/training_driver.py --train_script_shards N [scripts/train.py flags]

runs scripts/train.py in this one process on the global batches that N processes assemble (each
step: the rows of data shard 0 of N, then of shard 1, ...), the reference for its multi-process runs.
"""
import argparse
import os
import signal
import subprocess
import sys

from cpu_compile import FAST_COMPILE

DRIVER = os.path.abspath(__file__)


def start(workdir, log_path, *args) -> subprocess.Popen:
    """The driver in a subprocess, its output in log_path (`python tests/training_driver.py` has
    tests/ on its path, the script's folder, for training_toy)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, DRIVER, "--workdir", str(workdir), *map(str, args)],
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    proc.log_path = log_path
    return proc


def wait(proc, timeout=400) -> tuple[int, str]:
    """(exit status, the log's tail)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    with open(proc.log_path) as f:
        return rc, f.read()[-3000:]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--kill_after", type=int, default=0)
    p.add_argument("--pause_at", type=int, default=0,
                   help="after this step process 0 writes W/paused and waits for a signal (the test sends it)")
    p.add_argument("--checkpoint_every", type=int, default=3)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--coordinator", default="")
    p.add_argument("--local_devices", type=int, default=8)
    p.add_argument("--mesh", default="2,2,2", help="data,fsdp,tensor (their product: all devices)")
    a = p.parse_args()
    # Fast CPU compiles: these runs are about bookkeeping, not speed.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.local_devices} {FAST_COMPILE}"
    os.environ["JAX_PLATFORMS"] = "cpu"

    import grain
    import jax
    import numpy as np

    if a.num_processes > 1:
        jax.distributed.initialize(coordinator_address=a.coordinator, num_processes=a.num_processes,
                                   process_id=a.process_id)
    import training_toy as toy
    from bbu_jax.training import checkpointing, loop, metrics_logging, train_state
    from bbu_jax.training import optimizer as opt
    from bbu_jax.foundation import sharding
    from bbu_jax.training import step as step_lib

    _, params, _, loss_fn = toy.make_task(seed=0)
    tx, schedules = opt.make_optimizer(
        params, toy.optim_spec(dict(vision=1e-3, merger=2e-3, llm=1e-3, detection=4e-3, adapter=8e-3),
                               warmup_steps=2, head_freeze_steps=1), total_steps=a.steps)
    mesh = sharding.make_mesh(*map(int, a.mesh.split(",")))
    abstract = train_state.abstract_state(params, tx, 0)
    shardings = train_state.state_shardings(abstract, toy.param_shardings(params, mesh), mesh)

    n, pid = jax.process_count(), jax.process_index()
    rows = 8 // n

    def local_batch(i):  # this process's rows of global batch i (micro-batch axis added by the loop)
        return {k: v[pid * rows:(pid + 1) * rows] for k, v in toy.make_batch(int(i), rows=8).items()}

    data = iter(grain.MapDataset.range(10_000).map(local_batch).to_iter_dataset())
    ckpt = checkpointing.Checkpointer(os.path.join(a.workdir, "checkpoints"), max_to_keep=2, async_save=True)
    restored = ckpt.restore_latest(train_state.with_shardings(abstract, shardings), data_iterator=data)
    if restored is None:
        start, state = 0, train_state.create_state(params, tx, 0, shardings)
    else:
        start, state, _ = restored
    fn = step_lib.jit_train_step(loss_fn=loss_fn, count_fn=toy.count_fn, tx=tx,
                                 labels=opt.group_labels(params), state_shardings=shardings, mesh=mesh)

    def on_step(step, state):
        if step == a.kill_after:
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if step == a.pause_at and pid == 0:  # the others wait for it in the next collective
            open(os.path.join(a.workdir, "paused"), "w").close()
            signal.pause()  # returns once the loop's handler has run

    logger = metrics_logging.RunLogger(a.workdir, is_main=pid == 0, total_steps=a.steps, initial_step=start)
    spec = loop.LoopSpec(total_steps=a.steps, accum=1, log_every=1, eval_every=0,
                         checkpoint_every=a.checkpoint_every, max_consecutive_nonfinite=3, peak_flops=1.0)
    result = loop.train_loop(
        spec, state=state, train_step=fn, batches=data,
        batch_sharding=step_lib.accumulated_batch_sharding(mesh), data_iterator=data, checkpointer=ckpt,
        logger=logger, start_step=start, eval_fn=None, lr_fns=schedules, step_flops=None,
        token_count=lambda h: int(h["target_kind"].size), meta={}, on_step=on_step)
    logger.close()
    ckpt.close()
    if pid == 0:
        flat = jax.tree_util.tree_flatten_with_path(jax.device_get(result.state["params"]))[0]
        np.savez(os.path.join(a.workdir, "final_params.npz"),
                 **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
    print(f"{result.stop_reason} step={result.step} start={start}")
    return 3 if result.stop_reason == "signal" else 0


class MergedShards:
    """One iterator over the rows that N processes' train iterators load, in process order (the
    order make_array_from_process_local_data lays them out); checkpointable like each of them."""

    def __init__(self, iterators):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self):
        import numpy as np

        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return [it.get_state() for it in self.iterators]

    def set_state(self, state):
        for it, s in zip(self.iterators, state):
            it.set_state(s)


def train_script_shards(shards: int, argv: list[str]) -> None:
    """scripts/train.py in this process, its train iterator replaced by the N shards' merged."""
    import runpy

    from bbu_jax.data.pipeline import make_train_iterator
    from bbu_jax.workflows import train

    train.train_iterator = lambda specs, encoder: MergedShards([
        make_train_iterator(specs.data, encoder, seed=specs.run.seed, shard_index=k, shard_count=shards)
        for k in range(shards)])
    script = os.path.join(os.path.dirname(DRIVER), os.pardir, "scripts", "train.py")
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")  # exits with the script's status


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train_script_shards"]:
        train_script_shards(int(sys.argv[2]), sys.argv[3:])
    sys.exit(main())
