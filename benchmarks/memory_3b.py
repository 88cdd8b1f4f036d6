"""Per-device memory of the 3B train step, from XLA's memory plan: does it fit one 80 GB H100?

The product's step (``bbu_jax.perf.lowering.lower_train_step``: model + detection head of
configs/base.py, the task loss, per-group AdamW, non-finite guard) on abstract 3B params is
compiled -- nothing is allocated or run -- for one device and for FSDP over ``--devices`` fake CPU
devices, one row per device at the config's budgets (8192 tokens, its patch budget, its segments
per row), for each remat policy given, and ``compiled.memory_analysis()`` is read
(``bbu_jax.perf.memory``): arguments (state + batch), outputs, what outputs reuse of the donated
state, temporaries (activations, gradients, optimizer scratch), code. The state's parts are sized
from its shardings: params, Adam moments.

The attention kernel is "pallas" by default (the GPU's): off the GPU it runs in Pallas'
interpreter, which keeps the same residuals as the Triton kernel (q, k, v, output, log-sum-exp),
so the plan has the GPU's attention memory, not the (L, L) scores of the CPU's "xla" kernel. The
plan is the CPU backend's: the same partitioner and buffer sharing as the GPU's, but other fusions
and bf16 widened to f32 in places -- an estimate of the GPU plan, not a measurement. A verdict
follows for an 80 GB H100 (79.6 GiB) at jax's default allocator share
(XLA_PYTHON_CLIENT_MEM_FRACTION=0.75) and at 0.95, with the 10% margin remat "auto" keeps.

  python benchmarks/memory_3b.py                                  # 1 and 8 devices, every remat candidate
                                                                  # and Adam first-moment dtype
  python benchmarks/memory_3b.py --devices 1 --remat full --mu_dtype bfloat16
  python benchmarks/memory_3b.py --tiny                           # tiny model (CI)

Last line, for the smallest mesh given (one device by default): `memory_3b: fits one 80 GB H100
with remat R, adam_mu_dtype M (X GiB/device, XLA_PYTHON_CLIENT_MEM_FRACTION=F)` (the least
recomputation that fits, f32 moments first) or `memory_3b: does not fit one 80 GB H100 (least X
GiB/device, remat R, adam_mu_dtype M)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import record, run_specs  # noqa: E402
from bbu_jax.training.optimizer import MU_DTYPES  # noqa: E402

H100_GIB = 81559 / 1024  # nvidia-smi's total for an H100 80GB, MiB -> GiB
FRACTIONS = (0.75, 0.95)  # jax's default preallocation share; a setting that leaves room for the driver
MARGIN = 0.9  # what remat "auto" plans for (training.auto_remat.MARGIN)


def state_sizes(specs, modules, mesh) -> dict[str, float]:
    """GiB per device of the train state's params and optimizer state (Adam moments, counters),
    laid out as the run lays them out."""
    import jax
    import numpy as np

    from bbu_jax.training import task, train_state
    from bbu_jax.workflows import train

    _, params, _ = train_state.split_modules(modules)
    tx, _ = train.make_optimizer(specs, params, specs.run.num_train_steps)
    abstract = train_state.abstract_state(params, tx, specs.run.seed)
    shardings = train_state.state_shardings(abstract, task.param_shardings(modules, mesh), mesh)

    def per_device(key) -> float:
        total = 0
        for leaf, sh in zip(jax.tree_util.tree_leaves(abstract[key]), jax.tree_util.tree_leaves(shardings[key])):
            total += int(np.prod(sh.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        return total / 2**30

    return {"params": per_device("params"), "opt_state": per_device("opt_state")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=(1, 8), help="FSDP mesh sizes (fake CPU devices)")
    p.add_argument("--remat", nargs="+", default=None,
                   help="remat policies (default: remat auto's candidates, training.auto_remat.CANDIDATES)")
    p.add_argument("--mu_dtype", nargs="+", default=MU_DTYPES, choices=MU_DTYPES,
                   help="Adam first-moment dtypes (optim.adam_mu_dtype; default: each)")
    p.add_argument("--attention", default="pallas", help="attention kernel (default pallas: the GPU's)")
    p.add_argument("--tiny", action="store_true", help="tiny model and budgets (CI)")
    p.add_argument("--no-record", dest="record", action="store_false")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(args.devices)}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import numpy as np

    from bbu_jax.foundation import sharding
    from bbu_jax.models.qwen2_5_vl import Qwen25VLConfig
    from bbu_jax.perf.lowering import lower_train_step, random_modules
    from bbu_jax.perf.memory import memory_summary
    from bbu_jax.perf.synthetic import tiny_config
    from bbu_jax.training.auto_remat import CANDIDATES

    run = run_specs()
    policies = args.remat or list(CANDIDATES)
    cfg = tiny_config() if args.tiny else Qwen25VLConfig()
    d = run.data
    if args.tiny:
        d = dataclasses.replace(d, token_budget=256, patch_budget=256, segments_per_row=2, max_objects=8,
                                vision_memory_tokens=64, text_memory_tokens=16, caption_tokens=8)
    vocab = np.arange(256, dtype=np.int32)  # caption vocabulary: its size only sets a small head table
    rows = []
    for n in args.devices:
        mesh = sharding.make_mesh(1, n, 1, jax.devices()[:n])
        for policy, mu_dtype in itertools.product(policies, args.mu_dtype):
            specs = dataclasses.replace(
                run, model=dataclasses.replace(run.model, remat_policy=policy, attention_impl=args.attention),
                optim=dataclasses.replace(run.optim, mu_dtype=mu_dtype),
                data=dataclasses.replace(d, batch_rows=n),
                head=dataclasses.replace(run.head, max_caption_len=d.caption_tokens),
                mesh=dataclasses.replace(run.mesh, data=1, fsdp=n, tensor=1))
            dims = specs.data.budgets(rows=n, segments=specs.data.segments_per_row).dims()
            t0 = time.perf_counter()
            modules = random_modules(specs, cfg, abstract=True)
            compiled = lower_train_step(specs, modules, mesh, dims, caption_vocab=vocab).compile()
            seconds = time.perf_counter() - t0
            mem = memory_summary(compiled)
            del compiled
            sizes = state_sizes(specs, modules, mesh)
            rows.append({"devices": n, "remat": policy, "mu": mu_dtype, **sizes, **mem, "compile_s": seconds})
            print(f"compiled {n} device(s), remat {policy}, Adam mu {mu_dtype}: {mem['total']:.2f} GiB/device "
                  f"in {seconds:.0f} s", flush=True)

    print(f"{'tiny' if args.tiny else '3B'} Qwen2.5-VL + detection head, {d.token_budget} tokens / "
          f"{d.patch_budget} patches / {d.segments_per_row} segments per row, one row per device, "
          f"{run.model.compute_dtype} compute, f32 params and Adam second moment, attention {args.attention}; "
          f"CPU memory plan (an estimate of the GPU's), GiB per device")
    cols = ("params", "opt_state", "arguments", "outputs", "aliased", "temp", "code", "total")
    print(f"{'devices':>7} {'remat':>14} {'Adam mu':>9} " + " ".join(f"{c:>9}" for c in cols))
    for r in rows:
        print(f"{r['devices']:>7} {r['remat']:>14} {r['mu']:>9} " + " ".join(f"{r[c]:9.3f}" for c in cols))
    fewest = min(args.devices)  # the verdict: the smallest mesh measured, one device by default
    one = [r for r in rows if r["devices"] == fewest]
    fits = []
    for r in one:
        for fraction in FRACTIONS:
            budget = H100_GIB * fraction * MARGIN
            print(f"  {fewest} device(s), remat {r['remat']:>14}, Adam mu {r['mu']:>8}: {r['total']:6.2f} GiB vs "
                  f"{budget:.1f} GiB "
                  f"(fraction {fraction}, 90% margin): {'fits' if r['total'] <= budget else 'over'}")
            if r["total"] <= budget:
                fits.append((r, fraction))
                break
    where = "one 80 GB H100" if fewest == 1 else f"80 GB H100s, FSDP over {fewest}"
    if fits:
        # the least recomputation that fits (policies run from least to most), f32 moments first
        r, fraction = fits[0]
        headline = (f"memory_3b: fits {where} with remat {r['remat']}, adam_mu_dtype {r['mu']} "
                    f"({r['total']:.1f} GiB/device, XLA_PYTHON_CLIENT_MEM_FRACTION={fraction})")
    else:
        least = min(one, key=lambda r: r["total"])
        headline = (f"memory_3b: does not fit {where} (least {least['total']:.1f} GiB/device, remat "
                    f"{least['remat']}, adam_mu_dtype {least['mu']})")
    if not args.record:
        print(headline)
        return
    record("memory_3b", headline, tiny=args.tiny, attention=args.attention, token_budget=d.token_budget,
           patch_budget=d.patch_budget, segments=d.segments_per_row, rows=rows, h100_gib=H100_GIB)


if __name__ == "__main__":
    main()
