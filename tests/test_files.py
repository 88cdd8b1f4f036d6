"""Atomic file writes: all or nothing, ordinary permissions, UTF-8 JSON."""
import json
import os
import stat

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from bbu_jax.foundation.files import atomic_file, atomic_path, write_json_atomic, write_text_atomic


def test_error_inside_the_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write("half of the new")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == ["out.txt"]


def test_success_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_file(target) as f:
        f.write("new")
        assert target.read_text() == "old"  # nothing is visible before the block ends
    assert target.read_text() == "new"
    with atomic_file(tmp_path / "out.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "out.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        with open(tmp_path / "plain.txt", "w") as f:  # what an ordinary open() gives
            f.write("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("a.txt", "b.bin", "plain.txt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == expected, name


def test_json_round_trips_non_ascii_text_as_utf8(tmp_path):
    obj = {"desc": "螺丝/未拧紧", "note": "café", "n": [1, 2.5, None]}
    write_json_atomic(tmp_path / "a.json", obj, indent=1)
    raw = (tmp_path / "a.json").read_bytes()
    assert "螺丝".encode() in raw  # written as text, not \\u escapes
    assert json.loads(raw.decode("utf-8")) == obj
    assert raw.decode("utf-8") == json.dumps(obj, ensure_ascii=False, indent=1)


def test_libraries_that_want_a_filename_write_through_atomic_path(tmp_path):
    with atomic_path(tmp_path / "pic.png") as tmp:
        Image.new("RGB", (4, 3), (255, 0, 0)).save(tmp, format="PNG")
    with Image.open(tmp_path / "pic.png") as im:
        assert im.format == "PNG" and im.size == (4, 3)
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file(weights, str(tmp))
    np.testing.assert_array_equal(load_file(str(tmp_path / "w.safetensors"))["w"], weights["w"])
    assert sorted(os.listdir(tmp_path)) == ["pic.png", "w.safetensors"]


def test_safetensors_written_tensor_by_tensor_read_back_by_safetensors(tmp_path):
    """Arrays and TensorSources of every dtype and rank (empty and 0-d too), header padded to 8
    bytes as safetensors pads it; sources made in order into two reused buffers; shards + index."""
    import ml_dtypes

    from bbu_jax.foundation.files import TensorSource, save_safetensors_shards, write_safetensors

    rng = np.random.default_rng(0)
    arrays = {"a.bf16": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16), "b.scalar": np.float32(2.5),
              "c.empty": np.zeros((0, 4), np.int64), "d.bool": rng.random(7) > 0.5,
              "e.f16": rng.normal(size=(2, 2, 2)).astype(np.float16), "f.i32": np.arange(9, dtype=np.int32)}
    made, buffers = [], set()

    def source(key):
        def fill(out):
            made.append(key)
            buffers.add(out.ctypes.data)
            out[...] = arrays[key]
        return TensorSource(np.shape(arrays[key]), np.asarray(arrays[key]).dtype, fill)

    tensors = {k: (source(k) if i % 2 else np.asarray(v)) for i, (k, v) in enumerate(arrays.items())}
    write_safetensors(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    assert made == [k for i, k in enumerate(arrays) if i % 2] and len(buffers) <= 2
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0
    back = load_file(str(tmp_path / "m.safetensors"))
    assert list(back) == sorted(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.shape(v), k
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    shards = tmp_path / "shards"
    shards.mkdir()
    save_safetensors_shards({k: source(k) for k in arrays}, shards, max_shard_bytes=40)
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(np.asarray(v).nbytes for v in arrays.values())
    assert len(set(index["weight_map"].values())) > 1
    for k, v in arrays.items():
        np.testing.assert_array_equal(load_file(str(shards / index["weight_map"][k]))[k], v, err_msg=k)
