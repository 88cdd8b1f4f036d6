"""benchmarks/mfu.py, memory_3b.py, collectives.py, loader.py, packing.py and device_session.py run end to end at their tiny size (same code as
the 3B runs) and print their headlines. They run as programs: tests import nothing from benchmarks/
(the FLOP count they print is bbu_jax.training.flops, checked by hand in test_training_flops.py)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_tiny(script: str, *args: str) -> tuple[str, str]:
    """(stdout, its last line) of ``benchmarks/SCRIPT --tiny --no-record ARGS``."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--no-record", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, out.stdout.strip().splitlines()[-1]


def _check_mfu_tiny(stdout: str, last: str) -> None:
    """benchmarks/mfu.py --tiny: the product's step (head, matcher, guard) on the demo run's packed
    batches: both FLOP counts printed; the compiled step executes more products than the model
    needs (masked attention pairs, LM-head chunks), not less, and no step was skipped as
    non-finite (the script fails then)."""
    m = re.fullmatch(r"mfu: (\d+(?:\.\d+)?)% of \S+ TFLOP/s \(.+\), (\d+) tokens/s/device", last)
    assert m, last
    assert 0 < float(m.group(1)) < 100 and int(m.group(2)) > 0
    model = float(re.search(r"model TFLOP/step\s+(\S+)", stdout).group(1))
    hw, ratio = re.search(r"hw TFLOP/step\s+(\S+) \(compiled products; (\S+)x model\)", stdout).groups()
    assert 0 < model < float(hw) and 1.0 < float(ratio) < 3.0
    assert re.search(r"HFU vs peak\s+\d", stdout)
    losses = [float(x) for x in re.search(r"losses\s+(.+)", stdout).group(1).split()]
    assert len(losses) == 3 and all(0 < x < 100 for x in losses)


def test_mfu_pairs_only_prints_headline():
    _, last = _run_tiny("mfu.py", "--pairs_only")
    m = re.fullmatch(r"attention_pairs: attention forward (\S+) TFLOP \(cudnn\) -> (\S+) TFLOP \(pallas\)", last)
    assert m and float(m.group(2)) < float(m.group(1)), last


def test_memory_3b_tiny_prints_verdict():
    """The memory plan of the product's step at tiny size, FSDP over 2 fake devices (one compile):
    the state's parts add up (two f32 Adam moments per param), and a verdict line comes last."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_3b.py"), "--tiny", "--no-record",
                          "--devices", "2", "--remat", "full", "--mu_dtype", "bfloat16", "--attention", "xla"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"memory_3b: fits 80 GB H100s, FSDP over 2 with remat full, adam_mu_dtype bfloat16 \(\S+ GiB/device, "
                        r"XLA_PYTHON_CLIENT_MEM_FRACTION=0\.75\)", lines[-1]), lines[-1]
    row = next(line for line in lines if re.match(r"\s+2 +full +bfloat16 ", line))
    params, opt_state, arguments, outputs, aliased, temp, code, total = map(float, row.split()[3:])
    assert 1.4 < opt_state / params < 1.6  # mu in bf16, nu in f32 like the params
    assert arguments >= params + opt_state and aliased <= outputs
    assert total == pytest.approx(arguments + outputs - aliased + temp + code, abs=0.02)


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


def test_packing_plans_and_prints_headline(tiny_hf_dir):
    """benchmarks/packing.py end to end on a few field-like photos at configs/base.py's pixel limits:
    budgets planned for them, batches drawn through the train iterator, the fill per batch."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "packing.py"), "--field_photos", "12",
                          "--hf_dir", str(tiny_hf_dir), "--pack_buffer", "8", "--batches", "2", "--no-record"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    m = re.fullmatch(r"packing: token fill (\S+)%, patch fill (\S+)% \(budgets 8192 tokens, (\d+) patches, "
                     r"(\d+) segments per row\)", lines[-1])
    assert m and 0 < float(m.group(1)) <= 100 and 0 < float(m.group(2)) <= 100, lines[-1]
    assert int(m.group(3)) % 4 == 0 and int(m.group(4)) >= 1
    assert any(line.startswith("budgets for 8 rows") for line in lines)
    assert any(line.startswith("padding by cause") for line in lines)


def test_device_session_cpu_runs_every_phase(tmp_path):
    """benchmarks/device_session.py --cpu: the lent GPU's session at tiny size on the CPU, every line
    stamped with its time and phase as it comes, the log and a summary in --out. The carried wheels
    are the GPU image's: the CPU mode leaves them alone. Its mfu_tiny phase is mfu.py's CI run
    (_check_mfu_tiny)."""
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "numpy-0.0-py3-none-any.whl").touch()
    out_dir = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_session.py"), "--cpu", "--out",
                          str(out_dir), "--wheels", str(wheels)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert all(re.match(r"\[ *\d+\.\ds \w+\] ", line) for line in lines), lines
    assert re.search(r"\] device_session: 4/4 phases ok in \d+ s$", lines[-1]), lines[-1]
    assert "cpu mode: this environment's packages" in lines[1]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [(p["phase"], p["status"]) for p in summary["phases"]] == [
        ("env", "ok"), ("flash_check", "ok"), ("mfu_tiny", "ok"), ("loader_tiny", "ok")]
    log = (out_dir / "session.log").read_text()
    assert log.strip().splitlines() == lines
    mfu = [re.sub(r"^\[ *\d+\.\ds mfu_tiny\] ", "", line) for line in lines if " mfu_tiny] " in line]
    end = next(i for i, line in enumerate(mfu) if line.startswith("ok in "))  # then the summary's repeats
    assert mfu[0].startswith("start ")
    _check_mfu_tiny("\n".join(mfu[1:end]), mfu[end - 1])
    for shown in (r"env\] jax \d", r"flash_check\] .*1 passed", r"mfu_tiny\] compile: ", r"mfu_tiny\] step 2: ",
                  r"mfu_tiny\] mfu: ", r"loader_tiny\] loader: ", r"mfu_tiny\] kernels on .*: busy ",
                  r"mfu_tiny\]   by kind: "):
        assert re.search(shown, log), shown
    assert (out_dir / "trace_mfu_tiny.json.gz").stat().st_size > 0  # mfu.py --profile's trace
