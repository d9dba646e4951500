"""Decode the image behind a manifest URI into a uint8 array with the model's channel count.

:class:`ImageSource` serves two kinds of URI:

* ``idx://<path>#<record>``: a record of an IDX file, taken from the whole file loaded once per process
  (:func:`load_idx_images`, an LRU cache); nothing is ever written out as an image file.
* any fsspec URL or local path: read via fsspec and decoded with Pillow. Filesystem objects are created
  lazily per process (and dropped when pickled or after a fork), because fsspec/s3fs event loops are not
  fork-safe.

Channel conversion (the model's ``in_chans``):

* ``in_chans=3``: every mode is converted with Pillow's ``convert("RGB")``. Alpha (RGBA, LA, PA, palette
  transparency) is **dropped**, not composited: the stored colour values are kept, as torchvision's
  ImageFolder loader does. Grey and palette images are replicated/expanded; CMYK uses Pillow's naive
  conversion.
* ``in_chans=1``: colour images go to ``L`` with Pillow's ITU-R 601-2 luma (``L = R·299/1000 + G·587/1000
  + B·114/1000``); alpha is dropped.
* 16-bit integer images (``I;16*``, and ``I`` which Pillow uses for 16-bit PNGs) are scaled to 8 bit by
  ``value >> 8`` (clipped to 0..65535 first); floating-point images (``F``) are refused
  (``unsupported_mode``).

Bad input raises :class:`BadImageError` with a machine-readable ``reason`` from :data:`REASONS`; the extract
stage records it with :func:`failures_table` and marks the sample invalid.

A store that is *unavailable* is not bad input: transient read failures (HTTP 5xx, throttling, dropped connections,
timeouts) are retried with :func:`infra.storage.with_retries`, and if they persist :class:`infra.storage.StorageError`
propagates, so the unit fails without a completion marker and a re-run reads the image again. Recording such an
image as a skip would lose a good sample for good.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, UnidentifiedImageError

from infra import storage
from stages.manifest import IDX_SCHEME, parse_idx_uri, read_idx

log = logging.getLogger(__name__)

REASONS = frozenset(
    {
        "missing",  # the URI does not exist or cannot be read for good (also: IDX record out of range)
        "empty",  # zero bytes
        "not_an_image",  # no decoder recognises the bytes
        "truncated",  # the data stops before the image is complete
        "corrupt",  # recognised but the data does not decode
        "too_large",  # Pillow's decompression-bomb limit
        "unsupported_mode",  # a pixel mode we do not convert (e.g. floating point)
        "too_small",  # height or width below MIN_SIDE
    }
)
MIN_SIDE = 2
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_UNSUPPORTED_MODES = frozenset({"F"})


class BadImageError(Exception):
    """An image that cannot be used: ``reason`` is one of :data:`REASONS`, ``message`` says why in words."""

    def __init__(self, uri: str, reason: str, message: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown BadImageError reason {reason!r}")
        super().__init__(f"{uri}: {reason}" + (f" ({message})" if message else ""))
        self.uri = uri
        self.reason = reason
        self.message = message

    def __reduce__(self):
        """Pickle by constructor arguments, so the error crosses process boundaries (Ray, DataLoader)."""
        return (BadImageError, (self.uri, self.reason, self.message))

    def to_record(self, index: int) -> FailureRecord:
        """Return this failure as a row of the failures table for sample ``index``."""
        return FailureRecord(int(index), self.uri, self.reason, self.message)


# ------------------------------------------------------------------------------------------ failures table
class FailureRecord(NamedTuple):
    """One row of the failures table."""

    index: int
    uri: str
    reason: str
    message: str


FAILURES_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)


def failures_table(records: list[FailureRecord] | list[tuple]) -> pa.Table:
    """Make the failures table (:data:`FAILURES_SCHEMA`) from records, sorted by ``index``."""
    rows = sorted((FailureRecord(*r) for r in records), key=lambda r: r.index)
    return pa.Table.from_pylist([r._asdict() for r in rows], schema=FAILURES_SCHEMA)


# ----------------------------------------------------------------------------------------------- IDX
@functools.lru_cache(maxsize=8)
def load_idx_images(path: str) -> np.ndarray:
    """Load a whole IDX images file once per process (cached).

    Returns:
        uint8 array (N, H, W), read-only.
    """
    images = read_idx(path, expected_ndim=3)
    log.debug("loaded IDX %s: %s", path, images.shape)
    return images


def read_idx_record(uri: str) -> np.ndarray:
    """Return record ``r`` of ``idx://<path>#<r>`` as a uint8 array (H, W) (a view, do not modify).

    Raises:
        BadImageError: ``missing`` if the file is absent or the record is out of range.
    """
    path, record = parse_idx_uri(uri)
    try:
        images = load_idx_images(path)
    except FileNotFoundError as err:
        raise BadImageError(uri, "missing", str(err)) from err
    if record >= images.shape[0]:
        raise BadImageError(uri, "missing", f"record {record} >= {images.shape[0]} records")
    return images[record]


# ------------------------------------------------------------------------------------------ decoding
def decode_image(data: bytes, uri: str, in_chans: int) -> np.ndarray:
    """Decode encoded image bytes and convert to ``in_chans`` channels (see the module docstring).

    Args:
        data: The encoded file content.
        uri: Used in error messages only.
        in_chans: 1 (grey) or 3 (RGB).

    Returns:
        uint8 array (H, W, in_chans), C-contiguous.

    Raises:
        BadImageError: With reason ``empty``, ``not_an_image``, ``truncated``, ``corrupt``, ``too_large``,
            ``unsupported_mode`` or ``too_small``.
    """
    if not data:
        raise BadImageError(uri, "empty", "zero bytes")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would pass")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadImageError(uri, "too_large", str(err)) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImageError(uri, "not_an_image", str(err)) from err
    _load_pixels(img, uri)
    if min(img.size) < MIN_SIDE:
        raise BadImageError(uri, "too_small", f"{img.size[0]}x{img.size[1]} px")
    return to_channels(img, in_chans, uri)


def _load_pixels(img: Image.Image, uri: str) -> None:
    """Force the lazy decoder to read all the pixel data, mapping failures to BadImageError."""
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise BadImageError(uri, "too_large", str(err)) from err
    except (OSError, EOFError, SyntaxError, ValueError, IndexError) as err:
        text = str(err)
        reason = "truncated" if isinstance(err, EOFError) or "truncated" in text.lower() else "corrupt"
        raise BadImageError(uri, reason, text or type(err).__name__) from err


def to_channels(img: Image.Image, in_chans: int, uri: str = "<image>") -> np.ndarray:
    """Convert a loaded Pillow image to ``in_chans`` channels (rules in the module docstring).

    Returns:
        uint8 array (H, W, in_chans), C-contiguous.

    Raises:
        BadImageError: ``unsupported_mode`` for modes that are not converted.
        ValueError: If ``in_chans`` is not 1 or 3.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if img.mode in _UNSUPPORTED_MODES:
        raise BadImageError(uri, "unsupported_mode", f"mode {img.mode}")
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    target = "RGB" if in_chans == 3 else "L"
    try:
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        if img.mode != target:
            img = img.convert(target)
    except (ValueError, OSError) as err:
        raise BadImageError(uri, "unsupported_mode", f"mode {img.mode}: {err}") from err
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr.reshape(arr.shape[0], arr.shape[1], in_chans))


# ------------------------------------------------------------------------------------------ the source
class ImageSource:
    """Read manifest URIs as uint8 arrays (H, W, in_chans).

    Safe to pickle and to use after fork: filesystem objects are per process and rebuilt on demand.

    Args:
        in_chans: The model's input channels, 1 or 3.
        storage_options: fsspec options for non-local URLs; by default those of :mod:`infra.storage` (endpoint,
            region and timeouts from the environment; credentials resolved by botocore, never passed here).
        retry: back-off for transient read failures (default :data:`infra.storage.DEFAULT_RETRY`).
    """

    def __init__(self, in_chans: int, storage_options: dict | None = None,
                 retry: storage.RetryPolicy | None = None) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.in_chans = in_chans
        self.storage_options = None if storage_options is None else dict(storage_options)
        self.retry = retry
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        """Drop filesystem objects when pickled; the receiving process makes its own."""
        state = self.__dict__.copy()
        state["_filesystems"] = {}
        state["_pid"] = -1
        return state

    def read(self, uri: str) -> np.ndarray:
        """Return the decoded image of ``uri`` as uint8 (H, W, in_chans).

        Raises:
            BadImageError: If the image is missing or unusable (see :data:`REASONS`).
        """
        if uri.startswith(IDX_SCHEME):
            record = read_idx_record(uri)
            if min(record.shape) < MIN_SIDE:
                raise BadImageError(uri, "too_small", f"{record.shape[1]}x{record.shape[0]} px")
            return np.ascontiguousarray(np.repeat(record[:, :, None], self.in_chans, axis=2))
        return decode_image(self.read_bytes(uri), uri, self.in_chans)

    __call__ = read

    def read_bytes(self, uri: str) -> bytes:
        """Return the raw bytes behind an fsspec URL or local path.

        Raises:
            BadImageError: ``missing`` if it does not exist or cannot be read (a permanent error).
            infra.storage.StorageError: the store stayed unavailable through every retry (``transient`` is True).
        """
        protocol, _ = fsspec.core.split_protocol(uri)
        try:
            fs = self._filesystem(protocol or "file")
        except (ValueError, ImportError) as err:  # unknown protocol
            raise BadImageError(uri, "missing", f"{type(err).__name__}: {err}") from err
        path = fs._strip_protocol(uri)
        try:
            return storage.with_retries("read", uri, lambda: fs.cat_file(path), self.retry)
        except FileNotFoundError as err:
            raise BadImageError(uri, "missing", f"{type(err).__name__}: {err}") from err
        except storage.StorageError as err:
            if err.transient:
                raise
            cause = err.__cause__ or err
            raise BadImageError(uri, "missing", f"{type(cause).__name__}: {cause}") from err

    def _filesystem(self, protocol: str) -> fsspec.AbstractFileSystem:
        """The filesystem for ``protocol`` in this process (created on first use, reset after fork)."""
        if os.getpid() != self._pid:
            self._filesystems = {}
            self._pid = os.getpid()
        if protocol not in self._filesystems:
            if protocol in ("file", "local"):
                self._filesystems[protocol] = fsspec.filesystem(protocol)
            elif self.storage_options is None:
                self._filesystems[protocol] = storage.filesystem(f"{protocol}://")
            else:
                self._filesystems[protocol] = fsspec.filesystem(protocol, **self.storage_options)
        return self._filesystems[protocol]
