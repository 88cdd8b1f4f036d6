"""One call on a lent GPU (the device tool), run on its image as it is: the packages the image
lacks, or holds at versions other than the lock's, come from carried wheels (.whl/, ``make
wheels``), then, each in its own process with its own time budget inside one overall budget: the
versions and devices; the Triton flash kernels against the "xla" kernel on the GPU; the 3B train
step with each fused attention kernel and the product's remat choice (compile time, each step's
time, MFU, a trace of one step); how many GPUs one loader process feeds on the host's CPUs. Every
line is printed as it comes, stamped with the seconds since the start and its phase; the whole log
(``session.log``), a summary (``summary.json``: each phase's status, seconds and headlines), the
benchmark records (``records.jsonl``, lines for benchmarks/results.jsonl) and the traces go to
$OUT (``--out``, default ./device_out). The headlines are printed last.

  on a lent GPU (the device tool's run):  carry [".whl"], timeout_s 450,
      command "python3 benchmarks/device_session.py"
  any machine, CPU only, tiny sizes (CI):  python benchmarks/device_session.py --cpu

The overall budget (``--budget_s``) bounds the session whatever the phases do, so one rerun fits
in a lease; a phase past its time is stopped and the next one starts.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bbu_jax.foundation.xla_flags import set_gpu_flags  # noqa: E402  (no jax: safe before the wheels)
RESULTS = ROOT / "benchmarks" / "results.jsonl"
# Carried wheels go here, outside the repository, and on PYTHONPATH for every phase.
SITE = Path("/tmp/bbu_jax_site")
# Lines worth repeating at the end: test results and errors, compile and step times, benchmark headlines.
HEADLINE = re.compile(r"rel err|passed|failed|error|^compile|^remat auto|^kernels on|^  by kind|^mfu:"
                      r"|^attention_pairs:|^loader:|^  (step s|MFU)",
                      re.IGNORECASE)
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
            "grain", "transformers", "tokenizers", "numpy", "ml-dtypes", "jaxtyping", "beartype")
ENV_CODE = f"""
import importlib.metadata as m, platform
print("python", platform.python_version())
for name in {VERSIONS!r}:
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        pass
import grain, ml_collections, tensorboardX, faster_coco_eval  # what the wheels bring
import jax
print("devices", jax.devices())
print("device kind", jax.devices()[0].device_kind)
"""


def phases(cpu: bool, out: Path, remat: str = "auto") -> list[tuple[str, list[str], float]]:
    """(name, argv after the python executable, budget in seconds) of each phase. The loader phase
    measures the host's CPUs: it runs with JAX on the CPU (``Session.run``). ``remat``: the train
    step's policy ("auto", the product's default, compiles its candidates until one fits; a rerun
    names the one it chose and saves those compiles). Each 3B step phase traces one more step and
    leaves its Perfetto trace in ``out`` (``trace_<phase>.json.gz``, for ui.perfetto.dev)."""
    flash = ["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_flash_attention.py"]
    if cpu:  # Pallas' interpreter: one case shows the check runs
        return [("env", ["-c", ENV_CODE], 60),
                ("flash_check", [*flash, "-k", "bfloat16"], 120),
                ("mfu_tiny", ["benchmarks/mfu.py", "--tiny", "--no-record",
                              "--profile", str(out / "trace_mfu_tiny.json.gz")], 120),
                ("loader_tiny", ["benchmarks/loader.py", "--num_images", "12", "--scale", "1", "--batches", "1",
                                 "--workers", "0", "--no-record"], 120)]
    # the product's default remat ("auto": the least recomputation whose compiled step fits this GPU)
    return [("env", ["-c", ENV_CODE], 25),
            ("flash_check", [*flash, "-k", "xla_kernel or bfloat16"], 55),
            ("mfu_pallas", ["benchmarks/mfu.py", "--attention", "pallas", "--remat", remat,
                            "--profile", str(out / "trace_mfu_pallas.json.gz")], 150),
            ("mfu_cudnn", ["benchmarks/mfu.py", "--attention", "cudnn", "--remat", remat,
                           "--profile", str(out / "trace_mfu_cudnn.json.gz")], 110),
            ("loader", ["benchmarks/loader.py", "--num_images", "60", "--batches", "4", "--workers", "1", "4"], 40)]


class Session:
    def __init__(self, out: Path, budget_s: float):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.log = (out / "session.log").open("w")
        self.lock = threading.Lock()

    def say(self, phase: str, line: str) -> None:
        stamped = f"[{time.monotonic() - self.t0:6.1f}s {phase}] {line.rstrip()}"
        with self.lock:
            print(stamped, flush=True)
            self.log.write(stamped + "\n")
            self.log.flush()

    def run(self, name: str, argv: list[str], budget_s: float, reserved_s: float, env: dict) -> dict:
        """Runs one phase, echoing its output as it comes; stops it (its whole process group) when its
        time is up: its budget plus what earlier phases left unused (``reserved_s``, the later phases'
        budgets, stays theirs), never past the session's end."""
        left = self.deadline - time.monotonic()
        if left < min(20.0, budget_s):
            self.say(name, f"skipped: {left:.0f} s left in the session")
            return {"phase": name, "status": "skipped", "seconds": 0.0, "headlines": []}
        limit = min(max(budget_s, left - reserved_s), left)
        self.say(name, f"start (budget {limit:.0f} s): python {' '.join(a if len(a) < 80 else '<code>' for a in argv)}")
        start = time.monotonic()
        if name.startswith("loader"):
            env = {**env, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(limit, stop)
        timer.start()
        headlines = []
        for line in proc.stdout:
            self.say(name, line)
            if HEADLINE.search(line):
                headlines.append(line.strip())
        rc = proc.wait()
        timer.cancel()
        seconds = time.monotonic() - start
        status = "timeout" if timed_out.is_set() else "ok" if rc == 0 else f"failed (rc {rc})"
        self.say(name, f"{status} in {seconds:.1f} s")
        return {"phase": name, "status": status, "seconds": round(seconds, 1), "headlines": headlines[-12:]}


def pending_wheels(wheels: Path) -> list[tuple[Path, str | None]]:
    """(wheel, the version installed or None) for each carried wheel whose distribution this python
    lacks or holds at another version."""
    pending = []
    for whl in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
        name, version = whl.name.split("-")[:2]
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            pending.append((whl, installed))
    return pending


def install_wheels(session: Session, wheels: Path, env: dict) -> None:
    """Installs the `pending_wheels` into SITE, ahead of the image's packages on the phases' path:
    the run uses the lock's versions."""
    pending = pending_wheels(wheels)
    for whl, installed in pending:
        name, version = whl.name.split("-")[:2]
        session.say("wheels", f"{name} {version}" + (f" (the image has {installed})" if installed else ""))
    missing = [whl for whl, _ in pending]
    if not missing:
        session.say("wheels", f"nothing to install from {wheels}")
        return
    session.say("wheels", f"installing {len(missing)} wheel(s) into {SITE}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, missing)], check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))


def check_flags(session: Session, env: dict, xla_flags_before: str) -> None:
    """Starts jax once with the product's GPU flags; where this jaxlib aborts on a name it does not
    know, the phases run without them (``BBU_JAX_GPU_FLAGS=0``) rather than all failing alike."""
    proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    unknown = [line for line in (proc.stdout + proc.stderr).splitlines() if "unknown flag" in line.lower()]
    if proc.returncode == 0 or not unknown:
        return
    session.say("session", f"this jaxlib refuses the product's GPU flags ({unknown[0].strip()}); "
                           f"the phases run without them (BBU_JAX_GPU_FLAGS=0)")
    env["XLA_FLAGS"] = xla_flags_before
    env["BBU_JAX_GPU_FLAGS"] = "0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU only, tiny sizes (CI); not for timing")
    p.add_argument("--out", default=os.environ.get("OUT") or "device_out",
                   help="logs and results (default: $OUT, else ./device_out)")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="carried wheels (make wheels)")
    p.add_argument("--budget_s", type=float, default=390, help="the whole session, wheels included")
    p.add_argument("--remat", default="auto", help="the 3B step's remat policy (default: the product's, auto)")
    p.add_argument("--phases", default=None, help="comma-separated phase names to run (default: all)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    session = Session(out, args.budget_s)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu" if args.cpu else "cuda"}
    xla_flags_before = env.get("XLA_FLAGS", "")
    set_gpu_flags(env)  # every phase runs with the product's GPU flags (the scripts set them too)
    session.say("session", f"{'cpu, tiny' if args.cpu else 'gpu'}; budget {args.budget_s:.0f} s; out {out}; "
                           f"XLA_FLAGS {env.get('XLA_FLAGS') or '(none)'}")
    if args.cpu:  # CI's or a developer's environment, installed from the lock; the wheels are the image's
        session.say("wheels", "cpu mode: this environment's packages")
    else:
        install_wheels(session, Path(args.wheels), env)
    check_flags(session, env, xla_flags_before)
    results_before = RESULTS.read_text().splitlines() if RESULTS.exists() else []
    plan = phases(args.cpu, out, args.remat)
    if args.phases:
        wanted = args.phases.split(",")
        unknown = set(wanted) - {name for name, *_ in plan}
        if unknown:
            p.error(f"unknown phase(s) {sorted(unknown)}; these run here: {[name for name, *_ in plan]}")
        plan = [phase for phase in plan if phase[0] in wanted]
    summary = [session.run(name, argv, budget, sum(later for *_, later in plan[i + 1:]), env)
               for i, (name, argv, budget) in enumerate(plan)]
    results_after = RESULTS.read_text().splitlines() if RESULTS.exists() else []
    (out / "records.jsonl").write_text("".join(line + "\n" for line in results_after[len(results_before):]))
    total = time.monotonic() - session.t0
    (out / "summary.json").write_text(json.dumps({"mode": "cpu" if args.cpu else "gpu", "seconds": round(total, 1),
                                                  "phases": summary}, indent=1) + "\n")
    session.say("session", "== headlines")
    for phase in summary:
        session.say(phase["phase"], f"{phase['status']}, {phase['seconds']} s")
        for line in phase["headlines"]:
            session.say(phase["phase"], "  " + line)
    ok = all(phase["status"] == "ok" for phase in summary)
    session.say("session", f"device_session: {sum(ph['status'] == 'ok' for ph in summary)}/{len(summary)} phases ok "
                           f"in {total:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
