"""predict_detection (one forward + the head) against generating the JSON answer, same images.

    python benchmarks/predict_vs_generate.py --model demo_out/run/hf_export \
        --data demo_out/data/val.jsonl [--num_images 8] [--max_new_tokens 384]

Both paths use the same Predictor (the export's own settings: pixel limits, language), compile
once (a warm-up call), then are timed over the same batch of images; generation runs to
max_new_tokens or <|im_end|> without demonstrations, as a user would run it.
Last line: `predict_vs_generate: predict/generate = RATIO` (latency ratio).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from benchmarks._common import record
    from bbu_jax.data.schema import load_records
    from bbu_jax.inference import Predictor
    from bbu_jax.inference.answers import generate_answers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export folder, run folder or checkpoint step")
    p.add_argument("--data", required=True)
    p.add_argument("--num_images", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=384)
    args = p.parse_args()

    predictor = Predictor.from_pretrained(args.model)  # the settings the model was trained with
    model, encoder = predictor.model, predictor.encoder
    records = load_records(args.data)[0][:args.num_images]
    images = [r.student.images[0] for r in records]
    n = len(images)

    def predict():
        return predictor.detect(images, batch_size=n)

    def generate():
        answers, _ = generate_answers(model, encoder, records, num_teachers=0, max_new_tokens=args.max_new_tokens,
                                      batch_size=n, progress=False)
        return answers

    times = {}
    for name, fn in (("predict_detection", predict), ("generate_json", generate)):
        fn()  # compile
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        if name == "generate_json":
            tokens = sum(len(encoder.tokenizer(a.response)["input_ids"]) for a in out)
    print(f"{n} images, batch {n}, max_new_tokens {args.max_new_tokens} ({tokens} tokens generated)")
    print(f"{'path':<20}{'seconds':>10}{'ms/image':>10}")
    for name, s in times.items():
        print(f"{name:<20}{s:>10.3f}{1000 * s / n:>10.1f}")
    ratio = times["predict_detection"] / times["generate_json"]
    record("predict_vs_generate", f"predict_vs_generate: predict/generate = {ratio:.3f}", images=n,
           max_new_tokens=args.max_new_tokens, generated_tokens=tokens, seconds=times)


if __name__ == "__main__":
    main()
