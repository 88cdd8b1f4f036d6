"""Weights are never deleted: the converters refuse a non-empty --out without --overwrite and any --out
related to their source, a killed export leaves the previous --out as it was and its temporary is
removed by the next export, and folders get the user's umask."""
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bbu_jax.foundation.files import atomic_dir
from bbu_jax.workflows import export as export_lib
from convert_weights import flax_to_hf, hf_to_flax

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def _snapshot(folder: Path) -> dict[str, str]:
    """relative path -> content hash ('dir' for folders) of everything under ``folder``."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def _project(folder: Path) -> Path:
    """A user's folder: notes and a subfolder, which no refused command may touch."""
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return folder


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def params_ckpt(tiny_hf_dir, tmp_path_factory):
    return export_lib.convert(tiny_hf_dir, tmp_path_factory.mktemp("ckpt") / "flax")


def _run(cli, argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("cli", ["hf_to_flax", "flax_to_hf"])
def test_non_empty_out_is_refused_in_one_line_and_left_untouched(cli, tiny_hf_dir, params_ckpt, tmp_path,
                                                                  capsys):
    out = _project(tmp_path / "project")
    before = _snapshot(out)
    argv = (["--hf_dir", str(tiny_hf_dir)] if cli == "hf_to_flax" else ["--checkpoint", str(params_ckpt)])
    rc, err = _run(hf_to_flax if cli == "hf_to_flax" else flax_to_hf, [*argv, "--out", str(out)], capsys)
    assert rc == 1
    assert err == f"error: {out} is not empty; --overwrite replaces it\n"
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["project"]  # no temporary left beside it


def test_overwrite_replaces_the_folder_completely(tiny_hf_dir, tmp_path, capsys):
    out = _project(tmp_path / "out")
    assert _run(hf_to_flax, ["--hf_dir", str(tiny_hf_dir), "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert sorted(os.listdir(out)) == ["bbu_jax.json", "hf", "params"]
    assert _run(flax_to_hf, ["--checkpoint", str(out), "--out", str(tmp_path / "hf")], capsys)[0] == 0
    hf_files = sorted(os.listdir(tmp_path / "hf"))
    assert "model.safetensors" in hf_files and "config.json" in hf_files
    rc, _ = _run(flax_to_hf, ["--checkpoint", str(out), "--out", str(tmp_path / "hf"), "--overwrite",
                              "--max_shard_gb", "0.00003"], capsys)
    assert rc == 0  # the sharded export leaves no single model.safetensors of the previous one behind
    assert "model.safetensors" not in os.listdir(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]


@pytest.mark.parametrize("cli", ["hf_to_flax", "flax_to_hf", "flax_to_hf --base_hf_dir"])
@pytest.mark.parametrize("relation", ["is", "contains", "is inside", "is, through a link"])
def test_out_related_to_the_source_is_refused_even_with_overwrite(cli, relation, tiny_hf_dir, params_ckpt,
                                                                   tmp_path, capsys):
    # a copy, so a failure cannot damage the shared fixtures
    if cli == "hf_to_flax":
        src = shutil.copytree(tiny_hf_dir, tmp_path / "models" / "src")
        argv = ["--hf_dir", str(src)]
    elif cli == "flax_to_hf":
        src = shutil.copytree(params_ckpt, tmp_path / "models" / "src")
        argv = ["--checkpoint", str(src)]
    else:
        src = shutil.copytree(tiny_hf_dir, tmp_path / "models" / "src")
        argv = ["--checkpoint", str(params_ckpt), "--base_hf_dir", str(src)]
    (tmp_path / "alias").symlink_to(tmp_path / "models")
    out = {"is": src, "contains": src.parent, "is inside": src / "hf",
           "is, through a link": tmp_path / "alias" / "src"}[relation]
    before = _snapshot(tmp_path / "models")
    rc, err = _run(hf_to_flax if cli == "hf_to_flax" else flax_to_hf,
                   [*argv, "--out", str(out), "--overwrite"], capsys)
    assert rc == 1
    assert err.startswith(f"error: {out} {relation.split(',')[0]} the source folder ") and err.count("\n") == 1
    assert _snapshot(tmp_path / "models") == before


def test_the_runs_export_replaces_its_own_previous_export_head_included(params_ckpt, tmp_path):
    from flax import nnx

    from bbu_jax.models.detection_head import DetectionHead, HeadSpec

    model, hf_files = export_lib.load_params_checkpoint(params_ckpt)
    spec = HeadSpec(width=16, num_queries=4, num_layers=1, num_heads=2, mlp_dim=32, caption_layers=1,
                    max_caption_len=8)
    modules = {"model": model, "head": DetectionHead(spec, llm_hidden=model.config.text.hidden_size,
                                                     rngs=nnx.Rngs(0))}
    out = tmp_path / "run" / "hf_export"
    for vocab in ([5, 7], [5, 7, 9]):  # a resumed run that finishes exports again into its workdir
        export_lib.export(modules["model"], out, hf_files, head=modules["head"],
                          caption_vocab=np.array(vocab, np.int32), overwrite=True)
    assert json.loads((out / "detection_head_config.json").read_text())["caption_vocab"] == [5, 7, 9]
    assert {"config.json", "model.safetensors", "detection_head.safetensors"} <= set(os.listdir(out))
    assert os.listdir(tmp_path / "run") == ["hf_export"]


def test_a_killed_export_leaves_the_previous_out_and_the_next_one_removes_its_temporary(tmp_path):
    out = _project(tmp_path / "export")
    before = _snapshot(out)
    code = ("import sys, time\nfrom pathlib import Path\nfrom bbu_jax.foundation.files import atomic_dir\n"
            "with atomic_dir(Path(sys.argv[1]), overwrite=True) as tmp:\n"
            "    (tmp / 'model.safetensors').write_bytes(b'half of the weights')\n"
            "    print('writing', flush=True)\n"
            "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _snapshot(out) == before
    leftover = [p.name for p in tmp_path.iterdir() if p.name != "export"]
    assert len(leftover) == 1 and leftover[0].startswith(f".export.tmp-{proc.pid}-{HOST}-")

    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new weights")
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert _snapshot(out) == {"model.safetensors": hashlib.sha256(b"new weights").hexdigest()}


def test_stale_temporaries_of_dead_writers_go_live_and_foreign_ones_stay(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        dead = _dead_pid()
        names = {"dead": f".out.tmp-{dead}-{HOST}-abc123_x", "live": f".out.tmp-{sleeper.pid}-{HOST}-abc123_x",
                 "other host": f".out.tmp-{dead}-elsewhere-abc123_x", "dead old": f".out.old-{dead}-{HOST}-abc_x",
                 "other out": f".output.tmp-{dead}-{HOST}-abc123_x"}
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"gigabytes")
        (tmp_path / "out").mkdir()
        with atomic_dir(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "config.json").write_text("{}")
        left = set(os.listdir(tmp_path))
        assert left == {"out", names["live"], names["other host"], names["other out"]}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_writer_killed_between_the_two_renames_gets_its_previous_out_back(tmp_path):
    # overwrite moves out aside, then moves the new folder in; dying in between leaves out missing
    old = _project(tmp_path / f".out.old-{_dead_pid()}-{HOST}-abc123_x")
    before = _snapshot(old)
    with pytest.raises(FileExistsError, match="is not empty"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert _snapshot(tmp_path / "out") == before


def test_error_inside_the_block_keeps_the_previous_out(tmp_path):
    out = _project(tmp_path / "out")
    before = _snapshot(out)
    with pytest.raises(RuntimeError, match="writer failed"), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_out_filled_while_writing_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # empty: may be written
    with pytest.raises(FileExistsError, match="is not empty"), atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        (out / "notes.txt").write_text("written meanwhile by someone else")
    assert os.listdir(out) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_file_or_link_at_out_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("file", "link"):
        with pytest.raises(FileExistsError, match="is not a folder"), atomic_dir(tmp_path / name, overwrite=True):
            pass
    assert (tmp_path / "file").read_text() == "not a folder" and (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_folder_permissions_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "hf").mkdir()
        (tmp_path / "plain").mkdir()  # what an ordinary mkdir gives
    finally:
        os.umask(old)
    for folder in ("out", "out/hf", "plain"):
        assert stat.S_IMODE(os.stat(tmp_path / folder).st_mode) == mode, folder
