"""Durable files for checkpoints: fsync, checksums, atomic replace, checked JSON, and safetensors range I/O.

Nothing here knows about engines or process groups. The safetensors layout used by the range reader and the
streaming writer (safetensors' documented format, https://github.com/huggingface/safetensors#format): an
8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}, then the data; offsets are bytes relative to the end of the header, tensors are
row-major little-endian. Reading a range that way touches only the bytes asked for (no mmap of the file),
which is what keeps `ztune checkpoint consolidate` at about one tensor of memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ztune.errors import UserError

_CHUNK_BYTES = 8 << 20
# safetensors dtype names (format spec) for the dtypes checkpoints hold.
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL",
               torch.int16: "I16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
# A header larger than this is not a header (safetensors itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000


class CheckpointError(UserError):
    """A checkpoint that cannot be read: missing, incomplete or corrupted (the message names the file)."""


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (created / renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def write_bytes_durable(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` and fsync it (the caller renames or fsyncs the directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old or the new content, never a mix: write a
    temporary sibling, fsync it, rename it over `path`, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_bytes_durable(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _body_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_checked_json(path: str | os.PathLike, body: dict) -> None:
    """Write {"sha256": digest of the canonical body, "body": body} durably: any changed byte fails the check."""
    text = json.dumps({"sha256": _body_digest(body), "body": body}, indent=1, sort_keys=True)
    write_bytes_durable(path, text.encode())


def read_checked_json(path: str | os.PathLike) -> dict:
    """The body written by write_checked_json. Raises CheckpointError naming `path` if it is missing,
    truncated or altered."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing: the checkpoint is incomplete") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"checkpoint file {path} is corrupted (not readable JSON: "
                              f"{exc.__class__.__name__}); load an earlier tag") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict) or doc.get("sha256") != _body_digest(
            doc["body"]):
        raise CheckpointError(f"checkpoint file {path} is corrupted (checksum mismatch); load an earlier tag")
    return doc["body"]


def verify_file(path: str | os.PathLike, *, nbytes: int, sha256: str | None) -> None:
    """Check `path` has `nbytes` bytes and (when given) the sha256 hex digest; CheckpointError naming it if not."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing: the checkpoint is incomplete") from None
    if size != nbytes:
        raise CheckpointError(f"checkpoint file {path} is corrupted ({size} bytes, expected {nbytes}: "
                              "truncated or overwritten); load an earlier tag")
    if sha256 is not None and sha256_file(path) != sha256:
        raise CheckpointError(f"checkpoint file {path} is corrupted (sha256 mismatch); load an earlier tag")


# -- safetensors range reading -----------------------------------------------------------------------------
class TensorFile:
    """Random access to the tensors of one safetensors file: `read(name, start, end)` returns elements
    [start, end) of the flattened tensor, reading only those bytes. Use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115 -- closed by close() / __exit__
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            if n > _MAX_HEADER_BYTES:
                raise ValueError("header too large")
            header = json.loads(self._f.read(n))
        except (struct.error, ValueError):
            self._f.close()
            raise CheckpointError(f"checkpoint file {self.path} is corrupted (bad safetensors header); "
                                  "load an earlier tag") from None
        self._data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def names(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n

    def _entry(self, name: str) -> dict:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"checkpoint file {self.path} has no tensor {name!r}: it does not match its "
                                  "metadata") from None

    def read(self, name: str, start: int = 0, end: int | None = None, *, out: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Elements [start, end) of tensor `name`, flattened (1-D, the stored dtype); into `out` if given."""
        entry = self._entry(name)
        dtype = DTYPES[entry["dtype"]]
        numel = self.numel(name)
        end = numel if end is None else end
        if not 0 <= start <= end <= numel:
            raise CheckpointError(f"checkpoint file {self.path}: elements [{start}, {end}) of {name!r} are outside "
                                  f"its {numel}; the metadata does not match the file")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if out is None:
            out = torch.empty(end - start, dtype=dtype)
        if end > start:
            self._f.seek(self._data_start + entry["data_offsets"][0] + start * itemsize)
            buf = out.view(torch.uint8).numpy()
            if self._f.readinto(memoryview(buf)) != (end - start) * itemsize:
                raise CheckpointError(f"checkpoint file {self.path} is truncated; load an earlier tag")
        return out


def write_tensor_stream(path: str | os.PathLike, items: Iterable[tuple[str, torch.dtype, tuple[int, ...],
                        Callable[[], torch.Tensor]]], *, metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file from (name, dtype, shape, produce) items, calling each produce() only when
    its bytes are written, so at most one tensor is in memory. Returns the file's size in bytes."""
    items = list(items)
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, dtype, shape, _ in items:
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape, produce in items:
            t = produce().detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced shape {tuple(t.shape)}, declared {tuple(shape)}")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset
