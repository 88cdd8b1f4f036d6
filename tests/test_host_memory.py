"""glibc malloc settings for CPU training: applied on CPU-only hosts, skipped elsewhere."""
import subprocess
import sys

from bbu_jax.foundation.host_memory import cpu_only_host


def test_cpu_only_host_from_jax_platforms():
    assert cpu_only_host({"JAX_PLATFORMS": "cpu"})
    assert cpu_only_host({"JAX_PLATFORMS": " cpu "})
    assert not cpu_only_host({"JAX_PLATFORMS": "cuda,cpu"})
    assert not cpu_only_host({"JAX_PLATFORMS": "tpu"})


def test_keep_freed_memory_applies_and_large_blocks_are_reused():
    """In a fresh process (the settings are process-wide): applied on this glibc CPU machine, and
    a freed 256 MiB block comes back without new page faults."""
    code = """
import ctypes, resource, sys
from bbu_jax.foundation.host_memory import keep_freed_memory
assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
def touch():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(ctypes.c_void_p(p))
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
sys.exit(0 if faults < (n >> 12) // 10 else 1)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    print("page faults of the second 256 MiB block:", out.stdout.strip(), out.stderr[-500:])
    assert out.returncode == 0
