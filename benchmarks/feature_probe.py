"""How much of a part's identity the features at its centre token carry (the mean colour of its
patches, the vision tower's merged output, the LLM's final hidden state): a linear probe per
feature, fitted on train objects and scored on val objects (``bbu_jax.evaluation.feature_probe``).
The ceiling for the detection head's caption accuracy.

  python benchmarks/feature_probe.py --model demo_out/run/hf_export --data demo_out/data

Last line: `feature_probe: desc accuracy pixels X, merger Y, hidden Z (val)`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

import numpy as np  # noqa: E402

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an export folder, a run folder or a checkpoint step")
    p.add_argument("--data", required=True, help="folder with train.jsonl and val.jsonl")
    p.add_argument("--train_records", type=int, default=120)
    p.add_argument("--val_records", type=int, default=60)
    args = p.parse_args()

    from bbu_jax.data.schema import load_records
    from bbu_jax.evaluation.feature_probe import FEATURES, centre_features, probe
    from bbu_jax.evaluation.metrics import desc_type
    from bbu_jax.inference import Predictor

    predictor = Predictor.from_pretrained(args.model)
    train, _ = load_records(os.path.join(args.data, "train.jsonl"))
    val, _ = load_records(os.path.join(args.data, "val.jsonl"))
    train_x, train_y = centre_features(predictor, train[:args.train_records])
    val_x, val_y = centre_features(predictor, val[:args.val_records])
    print(f"objects: {len(train_y)} train, {len(val_y)} val; {len(set(train_y))} descs")
    print(f"{'feature':8s} {'dim':>4s}  desc acc val (train)  type acc val")
    desc_acc = {}
    for name in FEATURES:
        pred = probe(train_x[name], train_y, val_x[name])
        fit = probe(train_x[name], train_y, train_x[name])
        desc_acc[name] = np.mean([a == b for a, b in zip(pred, val_y)])
        type_acc = np.mean([desc_type(a) == desc_type(b) for a, b in zip(pred, val_y)])
        train_acc = np.mean([a == b for a, b in zip(fit, train_y)])
        print(f"{name:8s} {train_x[name].shape[1]:4d}  {desc_acc[name]:.2f} ({train_acc:.2f})           {type_acc:.2f}")
    print("feature_probe: desc accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in desc_acc.items()) + " (val)")


if __name__ == "__main__":
    main()
