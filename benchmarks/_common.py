"""Shared by the benchmark scripts: the run settings they measure with, the machine description and
the results.jsonl record."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.jsonl"
BASE_CONFIG = ROOT / "configs" / "base.py"


def run_specs(path: str | os.PathLike = BASE_CONFIG):
    """The typed settings (``bbu_jax.workflows.config.build_specs``) of a run's config file, by
    default configs/base.py (the 3B run): a benchmark measures what the run would do, never a
    retyped copy of its numbers."""
    from bbu_jax.workflows.config import build_specs, load_config

    return build_specs(load_config(path))


def cpu() -> str:
    """The CPU model and its widest vector ISA (ratios against PyTorch differ between AVX2 and AVX-512)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model} ({isa})"


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    return (f"{platform.node()} {cpu()}, {os.cpu_count()} cpus, jax {jax.__version__} on {dev.platform} "
            f"({dev.device_kind})")


def record(name: str, headline: str, **figures) -> None:
    """Append one JSON line to benchmarks/results.jsonl and print the headline last."""
    entry = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "machine": machine(), "headline": headline, **figures}
    with RESULTS.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    print(headline)
