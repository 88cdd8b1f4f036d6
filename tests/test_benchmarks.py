"""benchmarks/mfu.py, collectives.py and loader.py run end to end at their tiny size (same code as
the 3B runs) and print their headlines. They run as programs: tests import nothing from benchmarks/
(the FLOP count they print is bbu_jax.training.flops, checked by hand in test_perf_flops.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_tiny(script: str, *args: str) -> tuple[str, str]:
    """(stdout, its last line) of ``benchmarks/SCRIPT --tiny --no-record ARGS``."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--no-record", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, out.stdout.strip().splitlines()[-1]


def test_mfu_tiny_prints_headline():
    stdout, last = _run_tiny("mfu.py")
    m = re.fullmatch(r"mfu: (\d+(?:\.\d+)?)% of \S+ TFLOP/s \(.+\), (\d+) tokens/s/device", last)
    assert m, last
    assert 0 < float(m.group(1)) < 100 and int(m.group(2)) > 0
    losses = re.search(r"losses\s+(.+)", stdout).group(1).split()
    assert len(losses) >= 2 and float(losses[-1]) < float(losses[0])  # the optimizer moved the loss


def test_mfu_pairs_only_prints_headline():
    _, last = _run_tiny("mfu.py", "--pairs_only")
    m = re.fullmatch(r"attention_pairs: attention forward (\S+) TFLOP \(cudnn\) -> (\S+) TFLOP \(pallas\)", last)
    assert m and float(m.group(2)) < float(m.group(1)), last


def test_collectives_tiny_prints_headline():
    """FSDP over 8 fake devices: the gradient is reduced once (f32), weights are gathered twice
    in bf16 (forward, rematerialized forward: 2 x 0.5 P at most)."""
    _, last = _run_tiny("collectives.py")
    m = re.fullmatch(r"collectives: 1x8x1 step sends \S+ GiB reduced \((\S+) x params\), "
                     r"\S+ GiB gathered \((\S+) x params\)", last)
    assert m, last
    assert 0.95 < float(m.group(1)) < 1.05 and 0.5 < float(m.group(2)) < 1.05


def test_loader_at_3b_budgets_prints_headline():
    """benchmarks/loader.py end to end on a few small scenes: the 3B budgets of configs/base.py, the
    packed loader in the main process, and the GPUs its batches keep busy."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loader.py"), "--num_images", "12", "--scale",
                          "1", "--batches", "1", "--workers", "0", "--no-record"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    m = re.fullmatch(r"loader: 0 worker\(s\) feed (\S+) GPUs \(3B step at 50% MFU, packed\)", lines[-1])
    assert m and float(m.group(1)) > 0, lines[-1]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("standard", "packed"))}
    # packing puts several samples in a row: more samples per row, more of the token budget used
    assert float(rows["packed"][8]) > float(rows["standard"][8]) == 1.0
    assert float(rows["packed"][6].rstrip("%")) > float(rows["standard"][6].rstrip("%"))
