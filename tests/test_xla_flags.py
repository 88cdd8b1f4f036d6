"""The XLA flags set on GPU hosts: composed without overriding the user's, only where a GPU is, and
known to the installed jaxlib (an unknown name in XLA_FLAGS aborts the process)."""
import os
import subprocess
import sys

import pytest

from bbu_jax.foundation.xla_flags import GPU_FLAGS, compose, flag_names, gpu_host, set_gpu_flags


def test_compose_appends_only_flags_not_yet_named():
    user = "--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false"
    out = compose(user, GPU_FLAGS)
    assert out.startswith(user)
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in out  # the user's value wins
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in out
    assert flag_names(out) == flag_names(user) | set(GPU_FLAGS)
    assert compose(out, GPU_FLAGS) == out  # idempotent: entry points may call it in turn
    assert compose("", {"a": "1"}) == "--a=1"
    assert flag_names("--a --b=x\n  --c=--d") == {"a", "b", "c"}


@pytest.mark.parametrize("environ, files, expected", [
    ({"JAX_PLATFORMS": "cpu"}, ["/dev/nvidia0"], False),  # JAX_PLATFORMS decides when set
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], True),
    ({"CUDA_VISIBLE_DEVICES": ""}, ["/dev/nvidia0"], False),  # every GPU hidden
    ({"CUDA_VISIBLE_DEVICES": "-1"}, ["/dev/nvidia0"], False),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, ["/dev/nvidia2"], True),
    ({}, ["/dev/nvidia0"], True),
    ({}, [], False),
])
def test_gpu_host_without_starting_jax(environ, files, expected):
    assert gpu_host(environ, device_files=lambda pattern: files if "nvidia" in pattern else []) is expected


def test_set_gpu_flags_touches_only_gpu_hosts():
    cpu = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--x=1"}
    assert not set_gpu_flags(cpu) and cpu["XLA_FLAGS"] == "--x=1"
    gpu = {"JAX_PLATFORMS": "cuda"}
    assert set_gpu_flags(gpu) and flag_names(gpu["XLA_FLAGS"]) == set(GPU_FLAGS)
    opted_out = {"JAX_PLATFORMS": "cuda", "BBU_JAX_GPU_FLAGS": "0", "XLA_FLAGS": "--x=1"}
    assert not set_gpu_flags(opted_out) and opted_out["XLA_FLAGS"] == "--x=1"


def test_installed_jaxlib_knows_every_flag():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": compose("", GPU_FLAGS)}
    proc = subprocess.run([sys.executable, "-c", "import jax; print(int(jax.numpy.ones(3).sum()))"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr[-2000:]
