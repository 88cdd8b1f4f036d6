"""Atomic writes of files and folders; the files of an HF model folder (safetensors shards, side files).

A reader, or a run restarted after a crash, sees either the old file or the complete new one, never
half of one: every write goes to a hidden temporary beside the target, which os.replace() then
swaps in. The temporary's name is unique (mkstemp), so two processes writing the same target never
share one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from safetensors.numpy import save_file

# Everything an HF Qwen2.5-VL folder carries besides config.json and the weights: tokenizer,
# chat template, processor and generation settings. Copied as they are on export.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)


def save_safetensors_shards(weights: dict[str, np.ndarray], folder: Path,
                            max_shard_bytes: int | None = None) -> None:
    """One model.safetensors, or HF-style shards plus model.safetensors.index.json."""
    if max_shard_bytes is None or sum(v.nbytes for v in weights.values()) <= max_shard_bytes:
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in weights.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer/processor/generation files that exist in ``src``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out``, on error it is removed."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    # os.umask can only be read by setting it, and for that moment every file another thread
    # creates gets the wrong mode; Linux reports it read-only in /proc/self/status.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a library that writes to a filename.

    On success the temporary is flushed to disk and replaces ``path``; on any exception it is
    removed and ``path`` is left as it was. The name has no extension, so a writer that guesses
    the format from it (PIL's ``save``) must be told the format.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates the file 0600; give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``open(path, mode, **open_kwargs)`` whose contents appear at ``path`` only when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8, all or nothing."""
    with atomic_file(path, encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> None:
    """``json.dumps(obj, ensure_ascii=False, **json_kwargs)`` as UTF-8, all or nothing."""
    write_text_atomic(path, json.dumps(obj, **{"ensure_ascii": False, **json_kwargs}))
