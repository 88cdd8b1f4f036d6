"""XLA flags the product sets on GPU hosts: collectives overlapped with compute. No jax import here.

XLA reads ``XLA_FLAGS`` once, when jax starts its backends, so entry points call
`set_gpu_flags` before anything initializes jax. A flag the user already names in ``XLA_FLAGS``
is never overridden, whatever its value.

The set is the overlap part of what MaxText's GPU configs set on every H100 run
(``src/maxtext/configs/gpu/a3/*.sh``) and what NVIDIA's JAX-Toolbox image sets by default:

- ``xla_gpu_enable_latency_hiding_scheduler``: schedules the FSDP all-gathers and gradient
  reduce-scatters of one layer to run during another layer's compute instead of in line with it.
- ``xla_gpu_enable_highest_priority_async_stream``: those collectives run on the highest-priority
  stream, so the compute kernels they overlap do not starve them.
- ``xla_gpu_enable_while_loop_double_buffering``: the decoder and vision blocks are scanned
  (one while loop each); unrolling the loop body twice gives the scheduler a next iteration to
  prefetch the weights of, which is what makes the overlap possible across a scan.

Left out on purpose: MaxText's combine thresholds (tuned per model and host count; to be measured
here first), its collective-pipelining flags (renamed between XLA versions: the jaxlib 0.10.2 name
``xla_gpu_enable_pipelined_all_gather`` was later deprecated for ``xla_gpu_pipeline_all_gather``,
and an unknown name in ``XLA_FLAGS`` aborts the process), and ``xla_gpu_enable_triton_gemm=
false`` (a matmul-emitter choice, not overlap; its effect on this model is for the device
measurement to show). Every flag below is known to jaxlib 0.10.2 and still set by MaxText's GPU
configs written for jax 0.11 (tests/test_xla_flags.py checks that the installed jaxlib accepts them).

``BBU_JAX_GPU_FLAGS=0`` leaves ``XLA_FLAGS`` as it is: XLA aborts on a flag name its version does
not know, so a jaxlib that has dropped one of these must still be usable without editing the code.

A GPU is detected without starting jax: ``JAX_PLATFORMS`` decides when set; otherwise
``CUDA_VISIBLE_DEVICES`` set empty (or -1) hides every GPU; otherwise an NVIDIA or AMD GPU device
file must exist. A false positive is harmless: jaxlib knows the GPU flags on every platform and
the CPU compiler ignores them.
"""
from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Mapping, MutableMapping

GPU_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
}
OPT_OUT = "BBU_JAX_GPU_FLAGS"  # "0": add none of GPU_FLAGS
GPU_PLATFORMS = {"cuda", "gpu", "rocm"}  # JAX_PLATFORMS names that mean a GPU backend
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd")  # NVIDIA GPUs; AMD's compute interface


def flag_names(xla_flags: str) -> set[str]:
    """The flags named in an ``XLA_FLAGS`` string (``--name=value`` or a bare ``--name``)."""
    return set(re.findall(r"(?:^|\s)--([A-Za-z0-9_]+)", xla_flags))


def compose(xla_flags: str, flags: Mapping[str, str]) -> str:
    """``xla_flags`` with every flag of ``flags`` it does not name yet appended."""
    present = flag_names(xla_flags)
    added = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    return " ".join(part for part in (xla_flags.strip(), *added) if part)


def gpu_host(environ: Mapping[str, str] = os.environ,
             device_files: Callable[[str], list[str]] = glob.glob) -> bool:
    """True when jax will find a GPU here, judged without starting jax (see the module doc)."""
    platforms = {p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()}
    if platforms:
        return bool(platforms & GPU_PLATFORMS)
    if environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return any(device_files(pattern) for pattern in GPU_DEVICE_FILES)


def set_gpu_flags(environ: MutableMapping[str, str] = os.environ) -> bool:
    """On a GPU host, adds `GPU_FLAGS` the user has not set to ``environ["XLA_FLAGS"]``; True if
    it did. Call before jax starts its backends (flags set later are ignored)."""
    if environ.get(OPT_OUT, "1").strip() == "0" or not gpu_host(environ):
        return False
    environ["XLA_FLAGS"] = compose(environ.get("XLA_FLAGS", ""), GPU_FLAGS)
    return True
