"""scripts/train.py as a user starts it on two hosts: two processes joined by jax.distributed (CPU
collectives over gloo, one CPU device each, a mesh of data=2) on the demo config at a tiny size:
trains, checkpoints, evaluates (losses, head metrics, generation) and exports. The reference is
one process with two CPU devices (the same mesh) fed the same global batches: each step's rows
of data shard 0 of 2, then of shard 1, as the two processes load them (training_driver.py
--train_script_shards). Same mesh, same batches: the losses agree to float32 rounding.

All three processes start together; XLA's cheapest CPU compile keeps them short (numerics are
the same for both runs, which is all that is compared).
"""
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from cpu_compile import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "training_driver.py"
STEPS = 3
# Measured (jax 0.10.2): bit-identical losses, gradient norms and exported weights. With two
# shards every cross-device sum has two operands, exact in either order, whether gloo or the one
# process adds them; 1e-6 (some 16 float32 roundings) leaves room for another reduction order in
# another XLA, while wrong rows, a process counted twice or a missed all-reduce move these by 1e-3+
# (the two processes on their own shards, not merged, differ from one by 1e-2 at step 1).
RTOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _demo_config(tmp: pathlib.Path):
    spec = importlib.util.spec_from_file_location("bbu_jax_config_demo", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.hf_dir = str(tmp / "tiny")
    c.data.train_jsonl, c.data.val_jsonl = str(tmp / "data" / "train.jsonl"), str(tmp / "data" / "val.jsonl")
    c.data.teacher_pool_jsonl = str(tmp / "data" / "teacher_pool.jsonl")
    c.demo.synthetic_num_images, c.demo.synthetic_teacher_pool_size, c.demo.synthetic_val_ratio = 12, 2, 0.2
    return c


def _flags(tmp: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    c = _demo_config(tmp)
    return ["--config", str(ROOT / "configs" / "demo.py"), f"--config.run.workdir={workdir}",
            f"--config.model.hf_dir={c.model.hf_dir}", f"--config.data.train_jsonl={c.data.train_jsonl}",
            f"--config.data.val_jsonl={c.data.val_jsonl}",
            f"--config.data.teacher_pool_jsonl={c.data.teacher_pool_jsonl}",
            f"--config.run.num_train_steps={STEPS}", "--config.run.log_every=1", "--config.optim.warmup_steps=1",
            f"--config.eval.every={STEPS}", "--config.checkpoint.every=2", "--config.eval.generate_samples=2",
            "--config.eval.generate_max_new_tokens=4", "--config.mesh.data=2"]


def _start(cmd: list[str], log: pathlib.Path, xla_flags: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=log.parent)
    proc.log_path = log
    return proc


def _wait(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return rc, proc.log_path.read_text()[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"one": workdir, "multi": workdir, "logs": {name: tail}} of the three processes' runs."""
    from bbu_jax.workflows.config import build_specs
    from bbu_jax.workflows.demo_assets import prepare_assets

    tmp = tmp_path_factory.mktemp("train_script")
    prepare_assets(build_specs(_demo_config(tmp)))  # once, before three processes could race for it
    one, multi = tmp / "one", tmp / "multi"
    port = _free_port()
    procs = {"one": _start([DRIVER, "--train_script_shards", 2, *_flags(tmp, one)], tmp / "one.log",
                           f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")}
    for pid in range(2):
        procs[f"multi{pid}"] = _start(
            [ROOT / "scripts" / "train.py", *_flags(tmp, multi), "--config.mesh.distributed=True",
             f"--config.mesh.coordinator_address=localhost:{port}", "--config.mesh.num_processes=2",
             f"--config.mesh.process_id={pid}"], tmp / f"multi{pid}.log", FAST_COMPILE)
    logs = {}
    for name, proc in procs.items():
        rc, logs[name] = _wait(proc)
        assert rc == 0, (name, logs[name])
    return {"one": one, "multi": multi, "logs": logs}


def _rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_two_processes_train_as_one_on_the_same_global_batches(runs):
    one, multi = _rows(runs["one"]), _rows(runs["multi"])
    train = {name: [r for r in rows if "train/loss" in r] for name, rows in (("one", one), ("multi", multi))}
    assert [r["step"] for r in train["multi"]] == [r["step"] for r in train["one"]] == list(range(1, STEPS + 1))
    for key in ("train/loss", "train/lm_loss", "train/bbox_l1_loss", "train/gn/llm", "train/gn/detection"):
        a, b = [r[key] for r in train["multi"]], [r[key] for r in train["one"]]
        print(f"{key:22s} 2 processes {np.array(a)}\n{'':22s} 1 process   {np.array(b)}  rel. error {_rel(a, b):.1e}")
        np.testing.assert_allclose(a, b, rtol=RTOL, err_msg=key)
    assert [r["train/token_fill"] for r in train["multi"]] == [r["train/token_fill"] for r in train["one"]]


def test_two_processes_evaluate_as_one(runs):
    (val_multi,), (val_one,) = ([r for r in _rows(runs[k]) if "val/loss" in r] for k in ("multi", "one"))
    assert val_multi["step"] == STEPS and val_multi["val/num_samples"] == val_one["val/num_samples"] > 0
    for key in ("val/loss", "val/lm_loss", "val/bbox_l1_loss", "val/head/box_AP50"):
        print(f"{key:20s} 2 processes {val_multi[key]:.7g}  1 process {val_one[key]:.7g}")
        np.testing.assert_allclose(val_multi[key], val_one[key], rtol=RTOL, err_msg=key)
    assert val_multi["val/generate/complete_json"] == val_one["val/generate/complete_json"]


def test_only_the_main_process_writes_the_run_files(runs):
    multi = runs["multi"]
    shape = [[(r["step"], sorted(r)) for r in _rows(runs[k])] for k in ("multi", "one")]
    assert shape[0] == shape[1]  # the rows one process writes, none from the second
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["stop_reason"] == "done" and summary["step"] == STEPS
    assert summary["last_checkpoint"] == str(multi / "checkpoints" / str(STEPS))
    assert len(list((multi / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert "exported to" in runs["logs"]["multi0"] and "exported to" not in runs["logs"]["multi1"]


def test_checkpoints_hold_every_process_data_position(runs):
    for step in (2, STEPS):
        data = runs["multi"] / "checkpoints" / str(step) / "data"
        states = [(data / f"process_{p}-of-2.json").read_text() for p in range(2)]
        assert all('"next"' in s for s in states) and states[0] != states[1]  # each reads its own shard


def test_export_holds_the_weights_one_process_trains(runs):
    from safetensors.numpy import load_file

    for name in ("model.safetensors", "detection_head.safetensors"):
        multi, one = (load_file(runs[k] / "hf_export" / name) for k in ("multi", "one"))
        assert multi.keys() == one.keys()
        worst = max(_rel(multi[k], one[k]) for k in one if np.linalg.norm(one[k]) > 0)
        print(f"{name}: largest rel. error of a tensor, 2 processes vs 1: {worst:.1e}")
        assert worst < RTOL, name
