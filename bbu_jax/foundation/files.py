"""Atomic writes of files and folders; the files of an HF model folder (safetensors shards read and
written, side files).

A reader, or a run restarted after a crash, sees either the old file or the complete new one, never
half of one: every write goes to a hidden temporary beside the target, which os.replace() then
swaps in. The temporary's name is unique (mkstemp, mkdtemp), so two processes writing the same target
never share one. A folder is never replaced unless its writer says so (``overwrite``), and a killed
writer's temporary folder is removed by the next writer of the same folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import mmap
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

# Everything an HF Qwen2.5-VL folder carries besides config.json and the weights: tokenizer,
# chat template, processor and generation settings. Copied as they are on export.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json", "generation_config.json",
)

log = logging.getLogger(__name__)
# In atomic_dir's temporary names; a '/' would make a name a path.
_HOST = socket.gethostname().replace(os.sep, "_")


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """A tensor made only when its turn to be written comes: ``fill(out)`` writes it into ``out``,
    an array of ``shape`` and ``dtype`` (a buffer the writer reuses), so a file of many tensors never
    holds more than two of them in memory."""
    shape: tuple[int, ...]
    dtype: np.dtype
    fill: Callable[[np.ndarray], None]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def array(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        self.fill(out)
        return out


def save_safetensors_shards(weights: Mapping[str, np.ndarray | TensorSource], folder: Path,
                            max_shard_bytes: int | None = None) -> None:
    """One model.safetensors, or HF-style shards (at most ``max_shard_bytes`` each, a larger tensor
    alone) plus model.safetensors.index.json; tensors in the order given."""
    total = sum(v.nbytes for v in weights.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(folder / "model.safetensors", weights, {"format": "pt"})
        return
    shards: list[dict[str, np.ndarray | TensorSource]] = [{}]
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
        write_safetensors(folder / name, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray | TensorSource],
                      metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file (8-byte little-endian header length, JSON header padded with spaces to 8
    bytes, each tensor's bytes in header order), written tensor by tensor; a ``TensorSource`` is
    filled into one of two reused buffers while the other one's bytes are being written.

    Hand-written because safetensors' ``save_file`` wants every tensor in memory at once and copies
    each once more before writing: for a 3B export that is the whole model twice over."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, t in tensors.items():
        header[key] = {"dtype": SAFETENSORS_CODES[np.dtype(t.dtype)], "shape": list(t.shape),
                       "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    largest = max((t.nbytes for t in tensors.values() if isinstance(t, TensorSource)), default=0)
    buffers = [np.empty(largest, np.uint8) for _ in range(2)]
    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="safetensors-write") as writer:
        f.write(len(text).to_bytes(8, "little") + text)
        pending: list[Future | None] = [None, None]  # the write that reads each buffer
        for i, t in enumerate(tensors.values()):
            slot = i % 2
            if pending[slot] is not None:
                pending[slot].result()  # its buffer is free again
            if isinstance(t, TensorSource):
                out = buffers[slot][:t.nbytes].view(t.dtype).reshape(t.shape)
                t.fill(out)
            else:
                out = np.ascontiguousarray(t)
            # one writer thread: the writes land in header order
            pending[slot] = writer.submit(f.write, out.reshape(-1).view(np.uint8).data)
        for done in pending:
            if done is not None:
                done.result()


# safetensors dtype codes (the header's "dtype") -> numpy
SAFETENSORS_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "BOOL": np.dtype(bool),
}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file (``map_tensor`` maps its bytes)."""
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file
    nbytes: int


def safetensors_tensors(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file by key, from its header (an 8-byte little-endian length,
    then JSON: dtype, shape and byte range of each tensor). Every range is checked against the
    file's size, so a truncated file fails here, naming the tensor, rather than in the middle of a load."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    tensors = {}
    for key, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {key!r} has an unreadable header entry {entry!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes or 8 + n + end > size:
            raise ValueError(f"{path}: tensor {key!r} ({entry['dtype']} {list(shape)}) does not fit its bytes "
                             f"{begin}..{end} of a {size - 8 - n}-byte data section (truncated file?)")
        tensors[key] = StoredTensor(path, dtype, shape, 8 + n + begin, nbytes)
    return tensors


def map_tensor(tensor: StoredTensor) -> np.ndarray:
    """``tensor`` as a read-only array over its pages of the file, mapped (and populated from the
    page cache in one call) for as long as the array lives.

    A caller that converts or transposes reads the file's bytes once, in that pass, rather than
    copying them into a buffer first; unmapping each tensor once used keeps the resident size to
    one tensor, where a map of the whole file would count every page read until the end."""
    start = tensor.offset - tensor.offset % mmap.ALLOCATIONGRANULARITY
    with open(tensor.file, "rb") as f:
        if tensor.nbytes == 0:
            return np.empty(tensor.shape, tensor.dtype)
        mapped = mmap.mmap(f.fileno(), tensor.offset + tensor.nbytes - start, offset=start, prot=mmap.PROT_READ,
                           flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    return np.frombuffer(mapped, tensor.dtype, math.prod(tensor.shape), tensor.offset - start).reshape(tensor.shape)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer/processor/generation files that exist in ``src``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Remove the temporaries of atomic_dir calls on ``out`` whose process died (kill -9, power loss):
    a half-written folder, or the previous ``out`` moved aside; the latter is put back when ``out``
    is missing (the writer died between the two renames of the swap). Only this host's temporaries
    are judged, since a pid says nothing about a process on another host sharing the filesystem."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-(.+)-[a-z0-9_]+")
    for entry in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if not m or m[3] != _HOST or _owner_alive(int(m[2])):
            continue
        try:
            if m[1] == "old" and not os.path.lexists(out):
                os.replace(entry, out)
                log.warning("%s: restored from %s, left by process %s that died replacing it", out, entry, m[2])
            else:
                shutil.rmtree(entry)
                log.info("removed %s, left by process %s that died writing %s", entry, m[2], out)
        except OSError as e:
            log.warning("could not remove the stale temporary %s: %s", entry, e)


def prepare_out_dir(out: str | os.PathLike, *, overwrite: bool,
                    sources: Sequence[str | os.PathLike] = ()) -> Path:
    """Check that ``out`` may be written and return it absolute; run it before long work so a
    refusal comes first. Refuses a path that is a file or a link, a non-empty folder unless
    ``overwrite``, and a folder that is, contains or lies inside one of ``sources`` (what the
    output is made from) whatever ``overwrite`` says. Then removes stale temporaries beside it."""
    out = Path(os.path.abspath(out))
    real = out.resolve()
    for src in sources:
        src_real = Path(src).resolve()
        relation = ("is" if real == src_real else "contains" if real in src_real.parents
                    else "is inside" if src_real in real.parents else None)
        if relation:
            raise ValueError(f"{out} {relation} the source folder {src}; write the output elsewhere")
    _remove_stale_temporaries(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out} exists and is not a folder (a file or a link); write the output elsewhere")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; --overwrite replaces it")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False,
               sources: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out``, on error it is removed.

    ``out`` is checked first (prepare_out_dir): a non-empty one is replaced only with ``overwrite``,
    never one related to ``sources``. The temporary's name carries this process's pid and host, so a
    later call can tell a dead writer's leftovers (gigabytes for a model) from a live one's.
    """
    out = prepare_out_dir(out, overwrite=overwrite, sources=sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-{_HOST}-", dir=out.parent))
    try:
        yield tmp
        # mkdtemp creates the folder 0700; give it the mode a plain mkdir() would.
        os.chmod(tmp, 0o777 & ~_umask())
        if not overwrite:
            try:  # an empty folder is replaced, one that filled up meanwhile is not
                os.replace(tmp, out)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(f"{out} is not empty; --overwrite replaces it") from None
                raise
        elif out.exists():
            old = out.with_name(f".{out.name}.old-" + tmp.name[len(prefix):])
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


def json_text(obj: Any, **json_kwargs: Any) -> str:
    """``json.dumps(obj, ensure_ascii=False, **json_kwargs)`` that UTF-8 can always encode: a lone
    surrogate (json.loads makes one of a "\\ud800" in a model's answer) stays a \\u escape, which
    reads back as the same string, so no text can break the file it goes to."""
    return json.dumps(obj, **{"ensure_ascii": False, **json_kwargs}).encode("utf-8", "backslashreplace").decode()


def write_json_atomic(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> None:
    """``json_text(obj, **json_kwargs)`` as UTF-8, all or nothing."""
    write_text_atomic(path, json_text(obj, **json_kwargs))


def write_jsonl_atomic(path: str | os.PathLike, rows: Sequence[Any]) -> None:
    """One ``json_text`` line per row, all or nothing."""
    write_text_atomic(path, "".join(json_text(r) + "\n" for r in rows))


def check_new_output(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """``check_writable``, and refusing a file that exists unless ``overwrite`` (the user's file)."""
    path = check_writable(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    return path


def check_writable(path: str | os.PathLike) -> Path:
    """``path`` absolute once its folder exists and takes a file (a temporary, removed at once):
    run before the long work whose result goes there, so a bad path fails first, in one line."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    nearest = next(p for p in path.parents if p.exists())
    if not nearest.is_dir():
        raise NotADirectoryError(f"{path}: {nearest} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent):
            pass
    except OSError as e:
        raise type(e)(f"{path}: cannot write there ({e.strerror})") from None
    return path
