"""Whole-process behaviour of the training loop (toy task, real loop/checkpoints/data state):
SIGKILL + resume gives the same losses as a straight run; two processes on localhost (CPU
collectives through jax.distributed) give the same losses as one.

All runs start together (they only compete for CPU), the resume once its killed run has died.
"""
import json
import os
import signal
import socket

import numpy as np
import pytest

from training_driver import start as _start, wait as _wait


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    d = {k: str(root / k) for k in ("straight", "killed", "multi")}
    port = _free_port()
    procs = {
        "straight": _start(d["straight"], root / "straight.log", "--steps", 6),
        "killed": _start(d["killed"], root / "killed.log", "--steps", 6, "--kill_after", 3),
    }
    for pid in range(2):  # two processes, one run folder (orbax writes each process's shards)
        procs[f"multi{pid}"] = _start(d["multi"], root / f"multi{pid}.log", "--steps", 3,
                                      "--num_processes", 2, "--process_id", pid,
                                      "--coordinator", f"localhost:{port}", "--local_devices", 4)
    out = {}
    rc, log = _wait(procs.pop("killed"))
    assert rc == -signal.SIGKILL, log
    out["killed_before_resume"] = _metrics(d["killed"])
    resume = _start(d["killed"], root / "resume.log", "--steps", 6)
    for name, proc in procs.items():
        rc, log = _wait(proc)
        assert rc == 0, (name, log)
    rc, log = _wait(resume)
    assert rc == 0 and "start=3" in log, log
    out.update(straight=_metrics(d["straight"]), resumed=_metrics(d["killed"]), multi=_metrics(d["multi"]))
    return out


def _series(rows, key):
    return [r["step"] for r in rows], np.array([r[key] for r in rows])


def test_sigkill_then_resume_matches_straight_run(runs):
    assert [r["step"] for r in runs["killed_before_resume"]] == [1, 2, 3]
    steps, straight = _series(runs["straight"], "train/loss")
    rsteps, resumed = _series(runs["resumed"], "train/loss")
    assert steps == rsteps == [1, 2, 3, 4, 5, 6]
    print("straight", straight, "\nresumed ", resumed)
    np.testing.assert_array_equal(resumed, straight)
    np.testing.assert_array_equal(_series(runs["resumed"], "train/wn/llm")[1],
                                  _series(runs["straight"], "train/wn/llm")[1])


def test_two_processes_match_one(runs):
    steps, multi = _series(runs["multi"], "train/loss")
    assert steps == [1, 2, 3]
    one = _series(runs["straight"], "train/loss")[1][:3]
    print("1 process ", one, "\n2 processes", multi)
    np.testing.assert_allclose(multi, one, rtol=1e-5)
    for key in ("train/wn/llm", "train/wn/detection", "train/gn/llm"):
        np.testing.assert_allclose(_series(runs["multi"], key)[1], _series(runs["straight"], key)[1][:3], rtol=1e-5)
    assert len(runs["multi"]) == 3  # one line per step: only the main process writes logs
