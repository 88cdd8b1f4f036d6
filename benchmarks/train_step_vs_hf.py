"""Train-step time of bbu_jax vs transformers + PyTorch on the CPU: same weights, inputs, labels.

One small Qwen2.5-VL (text hidden 512, 4 layers, vocab 8192; vision hidden 256, depth 4), batch 2
rows of 1024 tokens, one 448x448 image (1024 patches -> 256 image tokens) per row, language loss on
the last 512 tokens of each row. A full step = forward, backward, AdamW update (lr 1e-5 for every
parameter, configs/base.py's weight decay, betas and eps; the same on both sides), float32.

  bbu_jax       the product's train step as scripts/train.py builds it (task.build_modules,
                task.make_loss_fn with the head off, optimizer.make_optimizer with one lr for
                every group and no clipping, step.jit_train_step: NaN guard, per-group norms),
                state donated, XLA's default CPU threads.
  transformers  Qwen2_5_VLForConditionalGeneration.from_pretrained(attn_implementation="sdpa",
                float32), model(**inputs, labels=...).loss.backward(), torch.optim.AdamW.

Each side runs in its own worker process (no thread pools competing, separate memory accounting);
the parent alternates single steps between them and reports medians over the steps after warm-up.
Peak memory: once set up (model, inputs, JAX's optimizer state and compiled step resident), each
worker resets its peak RSS (write "5" to /proc/self/clear_refs), then reads VmHWM after all steps;
"step peak" is that minus the RSS at the reset (for PyTorch it includes AdamW's state, which
torch allocates in the first step: 2 x 4 bytes per parameter). bbu_jax also reports XLA's buffer plan
(memory_analysis: temp bytes of the compiled step). Achieved GFLOP/s uses the same analytic model
FLOP count for both sides (bbu_jax.training.flops.step_flops: useful matmul + attention FLOPs, windows and
causality respected, x3 for training), against a plain f32 (2048^3) matmul timed in each worker.
The "floor" line divides those FLOPs by XLA's matmul rate: the ratio bbu_jax would reach if every
product of its step ran as fast as that large square matmul and nothing else took time.

  python benchmarks/train_step_vs_hf.py [--steps 10] [--torch_threads 2] [--no-record]

Last line: `train_step_vs_hf: bbu_jax/transformers = RATIO` (median step time; goal <= 0.7).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

IMAGE_SIDE = 448
PATCH = 14
LR = 1e-5
OVERRIDES = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
                 vision_hidden_size=256, vision_intermediate_size=768, vision_num_heads=4, vision_depth=4,
                 vision_fullatt_block_indexes=[3])


# ----------------------------------------------------------------------------- shared inputs

def make_inputs(hf_dir: Path, rows: int, tokens: int, supervised: int, seed: int = 0) -> dict[str, np.ndarray]:
    """What the HF processor would return for rows of [text, image, text], plus HF labels."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    rng = np.random.default_rng(seed)
    grid = IMAGE_SIDE // PATCH
    n_img = grid * grid // 4
    prefix = 16
    ids = rng.integers(0, 600, (rows, tokens))  # regular (non-special) ids of the tiny tokenizer
    ids[:, prefix] = cfg["vision_start_token_id"]
    ids[:, prefix + 1:prefix + 1 + n_img] = cfg["image_token_id"]
    ids[:, prefix + 1 + n_img] = cfg["vision_end_token_id"]
    labels = np.full_like(ids, -100)
    labels[:, -supervised:] = ids[:, -supervised:]
    return {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones_like(ids, np.int64),
        "mm_token_type_ids": (ids == cfg["image_token_id"]).astype(np.int64),
        "pixel_values": rng.standard_normal((rows * grid * grid, 1176), dtype=np.float32),
        "image_grid_thw": np.tile(np.array([[1, grid, grid]], np.int64), (rows, 1)),
        "labels": labels.astype(np.int64),
    }


# ----------------------------------------------------------------------------- memory

def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Linux >= 4.0: VmHWM := current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


# ----------------------------------------------------------------------------- workers

def matmul_gflops(matmul, n: int = 2048, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        matmul()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


def jax_worker(hf_dir: Path, inputs: dict[str, np.ndarray], lm_chunk: int, scan_layers: bool):
    import jax
    import jax.numpy as jnp

    from benchmarks._common import run_specs
    from bbu_jax.data.batch import FIELDS, expected_shapes
    from bbu_jax.foundation import sharding
    from bbu_jax.models.qwen2_5_vl import processing
    from bbu_jax.training import optimizer, task, train_state
    from bbu_jax.training import step as step_lib

    run = run_specs()
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    model = dataclasses.replace(run.model, hf_dir=str(hf_dir), param_dtype="float32", compute_dtype="float32",
                                remat_policy="none", attention_impl="xla", scan_layers=scan_layers)
    modules = task.build_modules(model, None, seed=0, mesh=mesh)
    cfg = modules["model"].config
    graphdefs, params, rest = train_state.split_modules(modules)
    # no head: the language loss alone, unweighted like transformers' loss
    loss = dataclasses.replace(run.loss, weights=dataclasses.replace(run.loss.weights, lm=1.0), lm_chunk=lm_chunk)
    loss_fn = task.make_loss_fn(graphdefs, rest, loss, caption_vocab=None)
    # the run's AdamW at one constant lr for every group, unclipped: what the PyTorch side does
    optim = dataclasses.replace(run.optim, lrs={g: LR for g in optimizer.GROUPS}, warmup_steps=0,
                                min_lr_ratio=1.0, grad_clip_norm=0.0, head_freeze_steps=0)
    tx, _ = optimizer.make_optimizer(params, optim, total_steps=10**6)
    labels = optimizer.group_labels(params)
    abstract = train_state.abstract_state(params, tx, 0)
    shardings = train_state.state_shardings(abstract, task.param_shardings(modules, mesh), mesh)
    state = [train_state.create_state(params, tx, 0, shardings)]
    del modules, params

    # the batch contract: model inputs from the HF processor's arrays, targets from its labels,
    # an empty detection part (one segment, no objects)
    rows, length = inputs["input_ids"].shape
    batch = processing.prepare_hf_batch(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                        inputs["image_grid_thw"], image_token_id=cfg.image_token_id,
                                        vision_start_token_id=cfg.vision_start_token_id)
    labels_hf = inputs["labels"]
    batch["targets"] = np.pad(np.maximum(labels_hf[:, 1:], 0), ((0, 0), (0, 1))).astype(np.int32)
    batch["target_kind"] = np.pad(2 * (labels_hf[:, 1:] >= 0), ((0, 0), (0, 1))).astype(np.int8)
    dims = dict(B=rows, L=length, P=batch["patches"].shape[1], S=1, M=1, C=1, NV=1, NT=1)
    for name, shape in expected_shapes(dims).items():
        batch.setdefault(name, np.zeros(shape, FIELDS[name][1]))
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # one micro-batch
    train_step = step_lib.jit_train_step(loss_fn=loss_fn, count_fn=task.count_fn, tx=tx, labels=labels,
                                         state_shardings=shardings, mesh=mesh)
    compiled = train_step.lower(state[0], batch).compile()
    mem = compiled.memory_analysis()

    def step() -> float:
        state[0], out = compiled(state[0], batch)
        jax.block_until_ready(state[0])
        total, count = out["metrics"]["loss"]
        return float(total / count)

    a = jnp.asarray(np.random.default_rng(1).standard_normal((2048, 2048), dtype=np.float32))
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    extra = {"xla_temp_mib": mem.temp_size_in_bytes / 2**20 if mem else None,
             "xla_argument_mib": mem.argument_size_in_bytes / 2**20 if mem else None}
    return step, lambda: matmul_gflops(lambda: mm(a).block_until_ready()), extra


def torch_worker(hf_dir: Path, inputs: dict[str, np.ndarray], adamw: dict, threads: int):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(threads)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(adamw["b1"], adamw["b2"]), eps=adamw["eps"],
                            weight_decay=adamw["weight_decay"])
    t_in = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(**t_in).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    a = torch.randn(2048, 2048)
    return step, lambda: matmul_gflops(lambda: a @ a), {"torch_threads": torch.get_num_threads()}


def serve(side: str, workdir: Path, args) -> None:
    """Worker loop: 'step' -> {seconds, loss}; 'peak' starts the peak window; 'done' -> figures."""
    if args.keep_freed_memory:  # as scripts/train.py does; given to both sides alike
        from bbu_jax.foundation.host_memory import keep_freed_memory
        keep_freed_memory()
    inputs = dict(np.load(workdir / "inputs.npz"))
    hf_dir = workdir / "hf"
    step, matmul, extra = (jax_worker(hf_dir, inputs, args.lm_chunk, args.scan_layers) if side == "bbu_jax"
                           else torch_worker(hf_dir, inputs, json.loads((workdir / "adamw.json").read_text()),
                                             args.torch_threads))
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not reach the protocol pipe
    rss_setup = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t0 = time.perf_counter()
            loss = step()
            reply = {"seconds": time.perf_counter() - t0, "loss": loss}
        elif cmd == "peak":
            rss_setup = rss_kib()
            reset_peak()
            reply = {}
        elif cmd == "done":
            peak = rss_kib("VmHWM")
            reply = {"matmul_gflops": matmul(), "rss_before_steps_mib": rss_setup / 1024,
                     "peak_rss_mib": peak / 1024, "step_peak_mib": (peak - rss_setup) / 1024, **extra}
        else:
            raise ValueError(f"unknown command {cmd!r}")
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if cmd == "done":
            return


class Worker:
    def __init__(self, side: str, workdir: Path, argv: list[str]):
        self.side = side
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", side, "--workdir", str(workdir), *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker died (exit {self.proc.wait()})")
        return json.loads(line)


# ----------------------------------------------------------------------------- parent

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (alternating)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (JAX compiles before)")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--supervised", type=int, default=512, help="labelled tokens at the end of each row")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lm_chunk", type=int, default=1024, help="bbu_jax LM-loss chunk (tokens)")
    p.add_argument("--scan_layers", action="store_true",
                   help="bbu_jax: keep the layer loops as scans (default: unrolled, the faster CPU setting here)")
    p.add_argument("--torch_threads", type=int, default=2)
    p.add_argument("--no-keep_freed_memory", dest="keep_freed_memory", action="store_false",
                   help="leave glibc's malloc defaults in both workers (scripts/train.py changes them)")
    p.add_argument("--pause", type=float, default=3.0, help="seconds between steps (idle threads settle)")
    p.add_argument("--no-record", dest="record", action="store_false")
    p.add_argument("--worker", choices=("bbu_jax", "transformers"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        serve(args.worker, args.workdir, args)
        return

    from benchmarks._common import run_specs
    from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig
    from bbu_jax.training.flops import step_flops
    from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl

    passthrough = ["--lm_chunk", str(args.lm_chunk), "--torch_threads", str(args.torch_threads),
                   *(["--scan_layers"] if args.scan_layers else []),
                   *([] if args.keep_freed_memory else ["--no-keep_freed_memory"])]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_tiny_qwen2_5_vl(work / "hf", seed=0, vocab_size=args.vocab, **OVERRIDES)
        inputs = make_inputs(work / "hf", args.rows, args.tokens, args.supervised)
        np.savez(work / "inputs.npz", **inputs)
        # the run's AdamW for the PyTorch side, which imports nothing of bbu_jax (its memory is its own)
        optim = run_specs().optim
        (work / "adamw.json").write_text(json.dumps({"weight_decay": optim.weight_decay, "b1": optim.b1,
                                                     "b2": optim.b2, "eps": optim.eps}))
        workers = [Worker(side, work, passthrough) for side in ("bbu_jax", "transformers")]
        times: dict[str, list[float]] = {w.side: [] for w in workers}
        losses: dict[str, list[float]] = {w.side: [] for w in workers}
        for i in range(args.warmup + args.steps):
            if i == 0:
                for w in workers:
                    w.ask("peak")
            for w in workers if i % 2 == 0 else workers[::-1]:
                time.sleep(args.pause)  # the other side's trailing work (freeing its buffers) is done
                r = w.ask("step")
                losses[w.side].append(r["loss"])
                if i >= args.warmup:
                    times[w.side].append(r["seconds"])
        figures = {w.side: w.ask("done") for w in workers}
        for w in workers:
            w.proc.wait()
        cfg = Qwen25VLConfig.from_file(work / "hf" / "config.json")

    print("step times in order:", {k: [round(t, 2) for t in v] for k, v in times.items()})
    grid = IMAGE_SIDE // PATCH
    flops = step_flops(cfg, segments=[[args.tokens]] * args.rows, images=[[(1, grid, grid)]] * args.rows,
                       supervised=[args.supervised] * args.rows)  # each row's last tokens are labelled
    for side in times:
        med = statistics.median(times[side])
        figures[side].update(median_s=med, min_s=min(times[side]), max_s=max(times[side]),
                             gflops=flops / med / 1e9, first_loss=losses[side][0])
        figures[side]["matmul_fraction"] = figures[side]["gflops"] / figures[side]["matmul_gflops"]
    jx, pt = figures["bbu_jax"], figures["transformers"]
    loss_rel = abs(jx["first_loss"] - pt["first_loss"]) / abs(pt["first_loss"])
    ratio = jx["median_s"] / pt["median_s"]
    min_ratio = jx["min_s"] / pt["min_s"]  # less sensitive to other load on a shared machine
    # These FLOPs at XLA's large-matmul rate, nothing else: the ratio's practical floor here.
    floor_s = flops / (jx["matmul_gflops"] * 1e9)

    print(f"Qwen2.5-VL text 512x4 (vocab {args.vocab}), vision 256x4, batch {args.rows} x {args.tokens} tokens, "
          f"one {IMAGE_SIDE}x{IMAGE_SIDE} image per row, f32; {os.cpu_count()} cpus, "
          f"torch threads {pt['torch_threads']}, XLA default threads; bbu_jax layers "
          f"{'scanned' if args.scan_layers else 'unrolled'}; malloc keeps freed memory: {args.keep_freed_memory}; "
          f"{args.steps} alternating steps, {args.pause:g} s apart")
    print(f"model FLOPs per step {flops / 1e9:.1f} GFLOP; first-step loss rel. difference {loss_rel:.1e}")
    print(f"{'':13} {'median s':>9} {'min s':>7} {'max s':>7} {'GFLOP/s':>8} {'matmul GFLOP/s':>15} "
          f"{'of matmul':>9} {'step peak MiB':>14} {'peak RSS MiB':>13}")
    for side, r in figures.items():
        print(f"{side:13} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} {r['gflops']:8.1f} "
              f"{r['matmul_gflops']:15.1f} {r['matmul_fraction']:9.0%} {r['step_peak_mib']:14.0f} "
              f"{r['peak_rss_mib']:13.0f}")
    print(f"bbu_jax XLA buffer plan: temp {jx['xla_temp_mib']:.0f} MiB, arguments {jx['xla_argument_mib']:.0f} MiB")
    print(f"floor: the model FLOPs at XLA's {jx['matmul_gflops']:.0f} GFLOP/s take {floor_s:.2f} s = "
          f"{floor_s / pt['median_s']:.2f} x the PyTorch step (every product at the 2048^3 matmul's rate, "
          f"no other work)")
    print(f"ratio of fastest steps (less load-sensitive): {min_ratio:.2f}; load average now "
          f"{os.getloadavg()[0]:.1f}")
    headline = f"train_step_vs_hf: bbu_jax/transformers = {ratio:.2f}"
    if not args.record:
        print(headline)
        return
    from benchmarks._common import record

    record("train_step_vs_hf", headline, config={"text": "512x4", "vision": "256x4", "vocab": args.vocab,
                                                  "rows": args.rows, "tokens": args.tokens,
                                                  "image": IMAGE_SIDE, "supervised": args.supervised},
           steps=args.steps, lm_chunk=args.lm_chunk, scan_layers=args.scan_layers, pause_s=args.pause,
           keep_freed_memory=args.keep_freed_memory,
           step_times=times, model_gflop_per_step=flops / 1e9,
           first_loss_rel_diff=loss_rel, ratio=ratio, min_ratio=min_ratio, floor_ratio=floor_s / pt["median_s"],
           load_average=os.getloadavg()[0], **figures)


if __name__ == "__main__":
    main()
