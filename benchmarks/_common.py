"""Shared by the benchmark scripts: machine description and the results.jsonl record."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    return f"{platform.node()} {os.cpu_count()} cpus, jax {jax.__version__} on {dev.platform} ({dev.device_kind})"


def record(name: str, headline: str, **figures) -> None:
    """Append one JSON line to benchmarks/results.jsonl and print the headline last."""
    entry = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "machine": machine(), "headline": headline, **figures}
    with RESULTS.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    print(headline)
