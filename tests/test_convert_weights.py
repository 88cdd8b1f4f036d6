"""HF -> bbu_jax -> HF round trip and the converters' error messages."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bbu_jax.workflows import export as export_lib

ROOT = Path(__file__).resolve().parents[1]


def _weights(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def roundtrip(tiny_hf_dir, tmp_path_factory):
    """The CLIs, as a user runs them: HF -> params checkpoint -> HF."""
    d = tmp_path_factory.mktemp("convert")
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    for args in (["convert_weights.hf_to_flax", "--hf_dir", str(tiny_hf_dir), "--out", str(d / "flax")],
                 ["convert_weights.flax_to_hf", "--checkpoint", str(d / "flax"), "--out", str(d / "hf")]):
        subprocess.run([sys.executable, "-m", *args], check=True, cwd=ROOT, env=env, capture_output=True)
    return d


def test_roundtrip_identical_tensors_and_transformers_loads(tiny_hf_dir, roundtrip):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from bbu_jax.testing.hf_reference import processor_inputs, torch_logits

    src, out = _weights(tiny_hf_dir), _weights(roundtrip / "hf")
    assert sorted(src) == sorted(out)
    for k in src:
        np.testing.assert_array_equal(src[k], out[k], err_msg=k)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json"):
        assert (roundtrip / "hf" / name).read_bytes() == (tiny_hf_dir / name).read_bytes()

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        roundtrip / "hf", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    inputs = processor_inputs(tiny_hf_dir, ["<|im_start|>user\nhello BBU<|im_end|>\n"])
    np.testing.assert_array_equal(torch_logits(model.eval(), inputs), torch_logits(reference.eval(), inputs))


def test_untied_roundtrip_keeps_lm_head(tiny_hf_dir_untied, tmp_path):
    export_lib.convert(tiny_hf_dir_untied, tmp_path / "flax")
    model, hf_files = export_lib.load_params_checkpoint(tmp_path / "flax")
    export_lib.export(model, tmp_path / "hf", hf_files, max_shard_bytes=30_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # sharded export
    src, out = _weights(tiny_hf_dir_untied), _weights(tmp_path / "hf")
    assert "lm_head.weight" in out and sorted(src) == sorted(out)
    np.testing.assert_array_equal(src["lm_head.weight"], out["lm_head.weight"])


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("breakage, message", [
    ("no_config", "config.json not found"),
    ("no_weights", "no model.safetensors"),
    ("model_type", "model_type 'llama' is not supported"),
    ("wrong_shape", "model.norm.weight' has shape (3,)"),
    ("missing_key", "missing tensor 'model.norm.weight'"),
    ("unknown_key", "unexpected tensors ['model.extra.weight']"),
])
def test_hf_to_flax_errors_name_the_file_or_key(tiny_hf_dir, tmp_path, breakage, message):
    d = _broken_copy(tiny_hf_dir, tmp_path / "hf")
    weights = load_file(str(d / "model.safetensors"))
    if breakage == "no_config":
        (d / "config.json").unlink()
    elif breakage == "no_weights":
        (d / "model.safetensors").unlink()
    elif breakage == "model_type":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    else:
        if breakage == "wrong_shape":
            weights["model.norm.weight"] = np.ones(3, np.float32)
        elif breakage == "missing_key":
            del weights["model.norm.weight"]
        else:
            weights["model.extra.weight"] = np.ones(3, np.float32)
        save_file(weights, str(d / "model.safetensors"))
    with pytest.raises((FileNotFoundError, KeyError, ValueError)) as err:
        export_lib.convert(d, tmp_path / "out")
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_flax_to_hf_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bbu_jax params checkpoint"):
        export_lib.load_params_checkpoint(tmp_path)


def test_params_checkpoint_of_an_older_version_is_refused(tiny_hf_dir, tmp_path):
    """Version 1 params checkpoints hold (in, out) kernels: refused with what to do, not misread."""
    export_lib.convert(tiny_hf_dir, tmp_path / "flax")
    meta = tmp_path / "flax" / export_lib.META_FILE
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 1}))
    with pytest.raises(ValueError, match="version 1 of bbu_jax.params, this bbu_jax reads version 2; make the "
                                         "checkpoint again from its HF source with hf_to_flax"):
        export_lib.load_params_checkpoint(tmp_path / "flax")
