"""Decode speed of the JAX KV-cache generator vs transformers' generate, same tiny checkpoint and prompt.

Both sides decode greedily for exactly --max_new_tokens tokens (no early stop: the JAX generator gets
no stop ids, transformers gets min_new_tokens = max_new_tokens) on the same prompt (one image +
instruction, transformers' tokenizer and image processor), after one warm-up run each (compilation
for JAX). Each side is also timed with 1 new token (prefill + one step), so the decode rate
(max_new_tokens - 1) * batch / (t_full - t_one) excludes the prompt; end-to-end tokens/s includes it.
transformers runs PyTorch on the CPU (the only build here), so compare on a CPU machine.

  python benchmarks/generate.py [--max_new_tokens 256] [--batch 1] [--tied]

Prints a table; the last line is `generate: bbu_jax/transformers = RATIO` (decode tokens/s);
appends a JSON record to benchmarks/results.jsonl.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks._common import record  # noqa: E402
from bbu_jax.inference.generate import generate_tokens, pad_prompts, round_up  # noqa: E402
from bbu_jax.models.qwen2_5_vl import from_hf, processing  # noqa: E402
from bbu_jax.testing import hf_reference  # noqa: E402
from bbu_jax.workflows.tiny_model import write_tiny_qwen2_5_vl  # noqa: E402

PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>Detect every BBU equipment part in the image.<|im_end|>\n"
          "<|im_start|>assistant\n")


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="copies of the prompt")
    p.add_argument("--tied", action="store_true",
                   help="tied embeddings like the 3B (default untied: random tied weights repeat one token)")
    p.add_argument("--torch_threads", type=int, default=1,
                   help="intra-op threads for PyTorch (1 is fastest at tiny sizes; more oversubscribe a busy CPU)")
    args = p.parse_args()
    import torch

    n, b = args.max_new_tokens, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_tiny_qwen2_5_vl(os.path.join(tmp, "tiny"), seed=1, tie_word_embeddings=args.tied)
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 280, 3), dtype=np.uint8))
        inputs = hf_reference.processor_inputs(hf_dir, [PROMPT] * b, [[img]] * b)
        prompt_len = inputs["input_ids"].shape[1]

        model = from_hf(hf_dir)
        cfg = model.config
        batch = processing.prepare_hf_batch(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                            inputs["image_grid_thw"], image_token_id=cfg.image_token_id,
                                            vision_start_token_id=cfg.vision_start_token_id)
        prompt = pad_prompts([batch], rows=b, length=round_up(prompt_len, 64),
                             num_patches=round_up(batch["patches"].shape[1], 64))

        def jax_run(tokens):
            return generate_tokens(model, prompt, max_new_tokens=tokens, stop_ids=(), pad_id=0)

        ref = hf_reference.torch_reference_model(hf_dir)
        torch.set_num_threads(args.torch_threads)
        t_in = {k: torch.from_numpy(v) for k, v in inputs.items()}

        def hf_run(tokens):
            with torch.no_grad():
                out = ref.generate(**t_in, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            return out[:, prompt_len:].numpy()

        rows = {}
        for name, run in (("bbu_jax", jax_run), ("transformers", hf_run)):
            run(n), run(1)  # warm-up (compiles both JAX shapes)
            t_one, _ = timed(lambda: run(1))
            t_full, out = timed(lambda: run(n))
            if out.shape != (b, n):
                raise RuntimeError(f"{name} generated {out.shape}, expected {(b, n)}")
            rows[name] = {"seconds": t_full, "seconds_1_token": t_one,
                          "end_to_end_tokens_per_s": b * n / t_full,
                          "decode_tokens_per_s": b * (n - 1) / max(t_full - t_one, 1e-9), "tokens": out}
        same = int((rows["bbu_jax"]["tokens"] == rows["transformers"]["tokens"]).all(axis=1).sum())

    print(f"tiny Qwen2.5-VL ({'tied' if args.tied else 'untied'}), prompt {prompt_len} tokens, batch {b}, "
          f"{n} new tokens, greedy, no early stop; {os.cpu_count()} cpus, torch threads {args.torch_threads}")
    print(f"{'':14} {'total s':>9} {'1-token s':>10} {'e2e tok/s':>10} {'decode tok/s':>13}")
    for name, r in rows.items():
        print(f"{name:14} {r['seconds']:9.3f} {r['seconds_1_token']:10.3f} {r['end_to_end_tokens_per_s']:10.1f} "
              f"{r['decode_tokens_per_s']:13.1f}")
    print(f"identical greedy rows: {same}/{b}")
    ratio = rows["bbu_jax"]["decode_tokens_per_s"] / rows["transformers"]["decode_tokens_per_s"]
    figures = {name: {k: v for k, v in r.items() if k != "tokens"} for name, r in rows.items()}
    record("generate", f"generate: bbu_jax/transformers = {ratio:.2f}", prompt_tokens=prompt_len, batch=b,
           torch_threads=args.torch_threads,
           max_new_tokens=n, identical_rows=same, **figures,
           e2e_ratio=rows["bbu_jax"]["end_to_end_tokens_per_s"] / rows["transformers"]["end_to_end_tokens_per_s"])


if __name__ == "__main__":
    main()
