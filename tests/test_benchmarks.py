"""benchmarks/mfu.py, collectives.py and loader.py run end to end at their tiny size (same code as
the 3B runs) and print their headlines; mfu's FLOP count is checked by hand on a small case."""
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


def test_mfu_tiny_prints_headline():
    stdout, last = _run_tiny("mfu.py")
    m = re.fullmatch(r"mfu: (\d+(?:\.\d+)?)% of \S+ TFLOP/s \(.+\), (\d+) tokens/s/device", last)
    assert m, last
    assert 0 < float(m.group(1)) < 100 and int(m.group(2)) > 0
    losses = re.search(r"losses\s+(.+)", stdout).group(1).split()
    assert len(losses) >= 2 and float(losses[-1]) < float(losses[0])  # the optimizer moved the loss


def test_step_flops_by_hand():
    sys.path.insert(0, str(ROOT))
    from benchmarks.mfu import step_flops, tiny_config

    cfg = tiny_config()
    t, v = cfg.text, cfg.vision
    # one row: one 10-token segment, one 8x8-patch image (exactly one 64-patch window)
    got = step_flops(cfg, segments=[[10]], images=[[(1, 8, 8)]])
    text = t.num_hidden_layers * (64 * (64 + 32 + 32 + 64) + 3 * 64 * 128)  # q, k, v, o; mlp
    fwd = 2 * 10 * (text + 640 * 64) + 4 * t.num_hidden_layers * 4 * 16 * 55
    vis = 1176 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64)
    fwd += 2 * 64 * vis + 2 * 16 * (128 * 128 + 128 * 64) + 4 * 32 * 2 * 64 * 64
    assert got == pytest.approx(3 * fwd)



def test_batch_layout_reads_segments_and_grids():
    """What the loader benchmark feeds step_flops: segment lengths and image grids read back from a
    batch equal the ones the batch was built from (packed rows; a row of non-square images)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from benchmarks.mfu import batch_layout, packed_batch, tiny_config
    from bbu_jax.models.qwen2_5_vl import processing

    cfg = tiny_config()
    batch, seg_lens, grids = packed_batch(cfg, rows=2, tokens=256, segments=2, image_side=112)
    assert batch_layout(batch) == (seg_lens, grids)
    shapes = [(1, 4, 6), (1, 8, 8), (1, 2, 2)]
    lay = processing.vision_layout(shapes, window_size=112, patch_size=14, spatial_merge_size=2)
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    got = batch_layout({"segment_ids": seg, "patch_image_ids": lay.image_ids[None], "patch_pos": lay.pos[None]})
    assert got == ([[3, 2]], [shapes])
    with pytest.raises(ValueError, match="do not fill"):
        batch_layout({"segment_ids": seg, "patch_image_ids": lay.image_ids[None, :-1],
                      "patch_pos": lay.pos[None, :-1]})

def test_attention_pairs_by_hand():
    """A 512-token row of two causal 256-token samples: cudnn multiplies all 512^2 pairs; the
    pallas kernel's 128-query blocks visit 2, 4, 2, 4 key blocks of 64 (12 of 32); not causal, its
    64-query blocks visit exactly their sample's 4 key blocks."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from benchmarks.mfu import attention_pairs

    seg = np.repeat([[1, 2]], 256, axis=1).astype(np.int32)
    batch = {"segment_ids": seg, "patch_window_ids": seg, "patch_image_ids": seg}
    needed = 2 * 256 * 257 // 2
    assert attention_pairs(batch, "cudnn")["text"] == (512**2, needed)
    assert attention_pairs(batch, "pallas")["text"] == (12 * 128 * 64, needed)
    assert attention_pairs(batch, "pallas")["vision full"] == (2 * 256**2, 2 * 256**2)


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
