"""IDX files (the MNIST format): bounded reading, and the ``idx://<path>#<record>`` URIs of their records.

An IDX file is a big-endian header (magic ``00 00 <type> <ndim>``, then ``ndim`` 32-bit dimensions) and the raw
elements; MNIST-style data sets ship it gzip-compressed. :func:`read_idx` reads one within a byte bound
(:class:`stages.uri_policy.UriPolicy` ``max_idx_bytes``): a local path must be a regular file, the stored bytes are
read up to the bound, and a gzip stream is inflated incrementally (the header, then exactly the bytes it declares plus
one), so neither ``/dev/zero`` nor a small file inflating to gigabytes costs more than the bound, and both end in
:class:`IdxError` at once.
"""

from __future__ import annotations

import math
import os
import zlib

import fsspec
import numpy as np

from infra import storage
from stages.uri_policy import DEFAULT_MAX_IDX_BYTES, read_local

IDX_SCHEME = "idx://"
_IDX_UBYTE = 0x08


class IdxError(ValueError):
    """An IDX file that cannot be used: not IDX, an unsupported type or rank, a size that does not match its header,
    more than ``max_idx_bytes``, or not a regular file. The message names the file."""


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None,
             max_bytes: int = DEFAULT_MAX_IDX_BYTES) -> np.ndarray:
    """Read a whole IDX file (raw or gzip-compressed, detected from the content) into memory.

    Only the unsigned-byte element type (0x08) is supported: it is the one MNIST-style data sets use.

    Args:
        path: Local path (or fsspec URL) of the IDX file.
        expected_ndim: If given, the number of dimensions the file must declare (3 for images, 1 for labels).
        max_bytes: The most bytes the file may hold, compressed or declared by its header.

    Returns:
        uint8 array shaped as the header says, e.g. (N, 28, 28) for images or (N,) for labels; read-only.

    Raises:
        IdxError: On a bad magic number, an unexpected element type or rank, a size mismatch, more than
            ``max_bytes``, or a path that is not a regular file; the message names the file.
        FileNotFoundError: No file at ``path``.
    """
    return read_idx_file(path, expected_ndim, max_bytes)[0]


def read_idx_file(path: str | os.PathLike, expected_ndim: int | None = None,
                  max_bytes: int = DEFAULT_MAX_IDX_BYTES) -> tuple[np.ndarray, int]:
    """:func:`read_idx`, also returning the file's size in bytes as stored (compressed, for a .gz).

    A gzip stream is inflated incrementally: the header first, then exactly the bytes it declares plus one (to tell
    a longer stream), so a small file that would inflate to gigabytes costs a few bytes of output.
    """
    raw = _read_idx_bytes(path, max_bytes)
    stream = _Inflater(raw, path) if raw[:2] == b"\x1f\x8b" else _Plain(raw)
    head = bytes(stream.take(4))
    if len(head) < 4 or head[:2] != b"\x00\x00":
        raise IdxError(f"{path}: not an IDX file (magic number {head.hex()!r} must start with 0000)")
    dtype_code, ndim = head[2], head[3]
    if dtype_code != _IDX_UBYTE:
        raise IdxError(f"{path}: IDX element type 0x{dtype_code:02x} is not supported (only 0x08, uint8)")
    if expected_ndim is not None and ndim != expected_ndim:
        raise IdxError(f"{path}: IDX magic declares {ndim} dimensions, expected {expected_ndim}")
    dims = bytes(stream.take(4 * ndim))
    if len(dims) < 4 * ndim:
        raise IdxError(f"{path}: IDX header declares {ndim} dimensions but ends after {len(dims) // 4}")
    shape = tuple(int.from_bytes(dims[4 * k: 4 * k + 4], "big") for k in range(ndim))
    n_body = math.prod(shape)
    if 4 + 4 * ndim + n_body > max_bytes:
        raise IdxError(f"{path}: IDX header declares shape {shape} ({4 + 4 * ndim + n_body} bytes), more than "
                       f"data.max_idx_bytes = {max_bytes}")
    body = stream.take(n_body)
    if len(body) != n_body or stream.take(1):
        found = f"{len(body)}" if len(body) != n_body else f"more than {n_body}"
        raise IdxError(f"{path}: IDX header says shape {shape} but the file has {found} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape), len(raw)


def _read_idx_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The stored bytes of an IDX file; IdxError for a non-regular file or more than :func:`_stored_bound` bytes."""
    url, bound = os.fspath(path), _stored_bound(max_bytes)
    if storage.is_local(url):
        got = read_local(url.removeprefix("file://"), bound)
        if got.not_regular:
            raise IdxError(f"{path}: {got.not_regular}, not an IDX file")
        raw, size = got.data, max(got.size, len(got.data))
    else:
        with fsspec.open(url, "rb") as f:
            raw = f.read(bound + 1)
        size = len(raw)
    if size > bound:
        raise IdxError(f"{path}: the IDX file holds more than data.max_idx_bytes = {max_bytes} bytes")
    return raw


def _stored_bound(max_bytes: int) -> int:
    """Most stored bytes of an IDX file of at most ``max_bytes``: gzip may store incompressible data in a few more
    bytes than it holds (its header, and about 5 bytes per 16 KiB block)."""
    return max_bytes + max_bytes // 1000 + 1024


class _Plain:
    """An uncompressed IDX byte string, read front to back without copying."""

    def __init__(self, raw: bytes) -> None:
        self._view, self._at = memoryview(raw), 0

    def take(self, n: int) -> memoryview:
        out = self._view[self._at: self._at + n]
        self._at += len(out)
        return out


class _Inflater:
    """A gzip stream (one or more members) inflated on demand, never more output than asked for."""

    def __init__(self, raw: bytes, name: str | os.PathLike) -> None:
        self._d = zlib.decompressobj(wbits=31)
        self._input, self._name = raw, name

    def take(self, n: int) -> bytes:
        parts, need = [], n
        while need > 0:
            if self._d.eof:
                rest = self._d.unused_data
                if rest[:2] != b"\x1f\x8b":  # the last member ended; other trailing bytes are ignored, as gzip does
                    break
                self._d, self._input = zlib.decompressobj(wbits=31), rest
            data = self._d.unconsumed_tail or self._input
            self._input = b""
            try:
                chunk = self._d.decompress(data, need)
            except zlib.error as err:
                raise IdxError(f"{self._name}: corrupt gzip data ({err})") from None
            if not chunk and not self._d.eof and not self._d.unconsumed_tail:
                break  # no input left before the end of the stream: truncated
            parts.append(chunk)
            need -= len(chunk)
        return b"".join(parts)


def idx_uri(images_path: str | os.PathLike, record: int) -> str:
    """Return the manifest URI ``idx://<absolute path>#<record>`` of one IDX record."""
    return f"{IDX_SCHEME}{os.path.abspath(images_path)}#{int(record)}"


def parse_idx_uri(uri: str) -> tuple[str, int]:
    """Split ``idx://<path>#<record>`` into (path, record).

    Raises:
        ValueError: If ``uri`` is not of that form.
    """
    if not uri.startswith(IDX_SCHEME) or "#" not in uri:
        raise ValueError(f"not an IDX record URI (expected idx://<path>#<record>): {uri!r}")
    path, _, record = uri[len(IDX_SCHEME) :].rpartition("#")
    if not path or not record.isdigit():
        raise ValueError(f"not an IDX record URI (expected idx://<path>#<record>): {uri!r}")
    return path, int(record)
