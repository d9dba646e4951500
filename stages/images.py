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
stage records it with :func:`failures_table` and marks the sample invalid. Only facts about the image itself are bad
input: it does not decode, it is over the policy's bounds, or it is missing: a local path that does not exist or is
not a regular file, a key missing from an existing, readable bucket, a URI no filesystem serves (an unknown scheme).

Everything about the *store* stops the job instead, because recording it as a skip would lose good samples for good
(an expired token would mark a whole data set "missing" and its units complete): transient failures (HTTP 5xx,
throttling, dropped connections, timeouts) are retried with :func:`infra.storage.with_retries` and, if they persist,
raise :class:`infra.storage.StorageError`; a permanent one (access denied, an expired or invalid token, a bucket that
does not exist, a local file that cannot be opened) raises :class:`~infra.storage.StorageError` at once. Either way
the error names the URL and the unit fails without a completion marker, so a re-run reads the image again.

Reads follow a :class:`stages.uri_policy.UriPolicy`: a URI it refuses (scheme, metadata address) raises
:class:`~stages.uri_policy.UriPolicyError`, which also stops the job; an image over ``max_image_bytes`` or
``max_image_pixels`` is ``too_large``. A source whose size differs from the one its manifest recorded raises
:class:`SourceChangedError` (:meth:`ImageSource.read` with ``expected_size``). :func:`check_failure_rate` stops a
unit in which too many images failed (:class:`~stages.cache.failures.TooManyBadImagesError`).
"""

from __future__ import annotations

import functools
import io
import logging
import os
from typing import NamedTuple

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageFile, UnidentifiedImageError

from infra import storage
from stages.cache.failures import (  # noqa: F401 - re-exported: callers import the failures table from here
    FAILURES_SCHEMA,
    FailureRecord,
    TooManyBadImagesError,
    allowed_failures,
    check_failure_rate,
    failures_table,
)
from stages.idx import IDX_SCHEME, parse_idx_uri, read_idx_file
from stages.uri_policy import DEFAULT_MAX_IDX_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_POLICY, UriPolicy, read_local

log = logging.getLogger(__name__)

REASONS = frozenset(
    {
        "missing",  # no such object / not a regular file / unknown scheme (also: IDX record out of range)
        "empty",  # zero bytes
        "not_an_image",  # no decoder recognises the bytes
        "truncated",  # the data stops before the image is complete
        "corrupt",  # recognised but the data does not decode
        "too_large",  # over max_image_bytes or max_image_pixels, or Pillow's decompression-bomb limit
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


class SourceChangedError(RuntimeError):
    """The source behind a manifest row is no longer the one the manifest recorded (its size differs).

    Constructible from its message alone, so it keeps its type when a DataLoader worker re-raises it.
    """

    def __init__(self, message: str, uri: str = "") -> None:
        super().__init__(message)
        self.uri = uri


def _changed(uri: str, expected: int, found: int | str) -> SourceChangedError:
    return SourceChangedError(f"{uri}: the source changed after the manifest was made (manifest size {expected} "
                              f"bytes, found {found}); its cached targets belong to the old image. Rebuild the "
                              "manifest and extract again", uri)


# ----------------------------------------------------------------------------------------------- IDX
class IdxImages(NamedTuple):
    """A loaded IDX images file: ``images`` uint8 (N, H, W), read-only, and ``nbytes``, the file's stored size."""

    images: np.ndarray
    nbytes: int


@functools.lru_cache(maxsize=8)
def load_idx_images(path: str, max_bytes: int = DEFAULT_MAX_IDX_BYTES) -> IdxImages:
    """Load a whole IDX images file once per process (cached), within ``max_bytes``.

    Raises:
        stages.idx.IdxError: a malformed or oversized file, or not a regular file.
    """
    images, nbytes = read_idx_file(path, expected_ndim=3, max_bytes=max_bytes)
    log.debug("loaded IDX %s: %s", path, images.shape)
    return IdxImages(images, nbytes)


def read_idx_record(uri: str, max_bytes: int = DEFAULT_MAX_IDX_BYTES, expected_size: int | None = None) -> np.ndarray:
    """Return record ``r`` of ``idx://<path>#<r>`` as a uint8 array (H, W) (a view, do not modify).

    Args:
        uri: the record's URI.
        max_bytes: bound on the IDX file (``UriPolicy.max_idx_bytes``).
        expected_size: the IDX file's size the manifest recorded; None: not checked.

    Raises:
        BadImageError: ``missing`` if the file is absent or the record is out of range.
        SourceChangedError: the file's size differs from ``expected_size``.
    """
    path, record = parse_idx_uri(uri)
    try:
        idx = load_idx_images(path, max_bytes)
    except FileNotFoundError as err:
        raise BadImageError(uri, "missing", str(err)) from err
    if expected_size is not None and idx.nbytes != expected_size:
        raise _changed(uri, expected_size, f"{idx.nbytes} bytes in the IDX file")
    if record >= idx.images.shape[0]:
        raise BadImageError(uri, "missing", f"record {record} >= {idx.images.shape[0]} records")
    return idx.images[record]


# ------------------------------------------------------------------------------------------ decoding
def decode_image(data: bytes, uri: str, in_chans: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode encoded image bytes and convert to ``in_chans`` channels (see the module docstring).

    Args:
        data: The encoded file content.
        uri: Used in error messages only.
        in_chans: 1 (grey) or 3 (RGB).
        max_pixels: Largest width × height decoded; checked on the header, before any pixel data is.

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
    if img.size[0] * img.size[1] > max_pixels:
        raise BadImageError(uri, "too_large", f"{img.size[0]}x{img.size[1]} px, more than data.max_image_pixels = "
                                              f"{max_pixels}")
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
        retry: back-off for transient read failures (default :data:`infra.retry.DEFAULT_RETRY`).
        policy: which URIs may be read and how much of them (default :data:`stages.uri_policy.DEFAULT_POLICY`).
    """

    def __init__(self, in_chans: int, storage_options: dict | None = None,
                 retry: storage.RetryPolicy | None = None, policy: UriPolicy | None = None) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.in_chans = in_chans
        self.storage_options = None if storage_options is None else dict(storage_options)
        self.retry = retry
        self.policy = policy if policy is not None else DEFAULT_POLICY
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        """Drop filesystem objects when pickled; the receiving process makes its own."""
        state = self.__dict__.copy()
        state["_filesystems"] = {}
        state["_pid"] = -1
        return state

    def with_policy(self, policy: UriPolicy) -> ImageSource:
        """This source under ``policy``: itself when that is its policy already, else a copy sharing its
        filesystems."""
        if policy == self.policy:
            return self
        clone = object.__new__(ImageSource)
        clone.__dict__.update(self.__dict__, policy=policy)
        return clone

    def read(self, uri: str, expected_size: int | None = None) -> np.ndarray:
        """Return the decoded image of ``uri`` as uint8 (H, W, in_chans).

        Args:
            uri: a manifest URI.
            expected_size: the source's size in bytes as the manifest recorded it (for IDX: the file's); a
                different size raises :class:`SourceChangedError`. None: not checked.

        Raises:
            BadImageError: If the image is missing or unusable (see :data:`REASONS`).
            infra.storage.StorageError: the store refused or stayed unavailable (the job must stop).
            stages.uri_policy.UriPolicyError: the policy refuses the URI. stages.idx.IdxError: a bad IDX file.
            SourceChangedError: see ``expected_size``.
        """
        if uri.startswith(IDX_SCHEME):
            self.policy.check(uri)
            record = read_idx_record(uri, self.policy.max_idx_bytes, expected_size)
            if min(record.shape) < MIN_SIDE:
                raise BadImageError(uri, "too_small", f"{record.shape[1]}x{record.shape[0]} px")
            return np.ascontiguousarray(np.repeat(record[:, :, None], self.in_chans, axis=2))
        return decode_image(self.read_bytes(uri, expected_size), uri, self.in_chans, self.policy.max_image_pixels)

    __call__ = read

    def read_bytes(self, uri: str, expected_size: int | None = None) -> bytes:
        """Return the raw bytes behind an fsspec URL or local path, at most ``policy.max_image_bytes`` of them.

        Raises:
            BadImageError: ``missing`` (no such object in a readable bucket, no such local file, not a regular file,
                a scheme no filesystem serves) or ``too_large``.
            infra.storage.StorageError: any failure of the store: permanent (access denied, expired token, no such
                bucket) or transient through every retry (``transient`` is True). It names the URL.
            stages.uri_policy.UriPolicyError: the policy refuses the URI.
            SourceChangedError: the size differs from ``expected_size``.
        """
        protocol = fsspec.core.split_protocol(uri)[0] or "file"
        if protocol not in fsspec.available_protocols():
            raise BadImageError(uri, "missing", f"no filesystem serves the scheme {protocol!r}")
        self.policy.check(uri)
        try:
            fs = self._filesystem(protocol)
        except (ValueError, ImportError) as err:  # a protocol whose implementation is not installed
            raise BadImageError(uri, "missing", f"{type(err).__name__}: {err}") from err
        limit = self.policy.max_image_bytes if expected_size is None else min(self.policy.max_image_bytes,
                                                                               expected_size)
        try:
            data, size = self._fetch(fs, uri, limit)  # size: exact, or limit + 1 for "more than limit"
        except FileNotFoundError as err:
            if storage.is_missing_container(err):
                raise storage.StorageError(f"read {uri} failed: the bucket does not exist "
                                           f"({type(err).__name__}: {err})") from err
            raise BadImageError(uri, "missing", f"{type(err).__name__}: {err}") from err
        found = f"{size} bytes" if size >= 0 else f"more than {limit} bytes"
        if size < 0 or size > limit:
            if expected_size is not None and expected_size <= self.policy.max_image_bytes:
                raise _changed(uri, expected_size, found)
            raise BadImageError(uri, "too_large", f"{found}, more than data.max_image_bytes = "
                                                  f"{self.policy.max_image_bytes}")
        if expected_size is not None and size != expected_size:
            raise _changed(uri, expected_size, found)
        return data

    def _fetch(self, fs: fsspec.AbstractFileSystem, uri: str, limit: int) -> tuple[bytes, int]:
        """(at most ``limit + 1`` bytes of ``uri``, its size in bytes, or -1 when it is only known to be over
        ``limit``), retried on transient errors.

        Raises:
            FileNotFoundError: absent. BadImageError: not a regular local file. infra.storage.StorageError: else.
        """
        path = fs._strip_protocol(uri)
        if isinstance(fs, LocalFileSystem):
            got = storage.with_retries("read", uri, lambda: read_local(path, limit), self.retry)
            if got.not_regular:
                raise BadImageError(uri, "missing", got.not_regular)
            size = max(got.size, len(got.data))  # the file may grow while it is read
            return got.data, size if len(got.data) <= limit else -1

        def ranged_get() -> bytes:
            try:
                return fs.cat_file(path, start=0, end=limit + 1)
            except OSError as err:
                if storage.error_code(err) == "InvalidRange":  # a range of an empty object is unsatisfiable
                    return b""
                raise

        data = storage.with_retries("read", uri, ranged_get, self.retry)
        return data, len(data) if len(data) <= limit else -1

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
