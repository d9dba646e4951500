"""The image manifest: which images a target cache covers, in which order (docs/cache-format.md#5-the-manifest).

A manifest is a Parquet table with one row per sample:

* ``index`` (int64): 0..N-1, the sample's position in the cache.
* ``uri`` (string): an fsspec URL of an encoded image, or ``idx://<absolute path>#<record>`` for record
  ``record`` of an IDX images file (Fashion-MNIST); see :func:`idx_uri`.
* ``label`` (int64, nullable): the class index, null when unknown.
* ``size`` (int64, nullable): bytes of the source file (for IDX records: of the whole IDX file as stored); null when
  not known.
* ``etag`` (string, nullable): the object store's ETag of the source, where the store has one.
* ``mtime`` (float64, nullable): the source's modification time (seconds since the epoch), where the store has one.

``size``, ``etag`` and ``mtime`` identify the source as it was when the manifest was made: the train stage refuses an
image whose size differs (:class:`stages.images.SourceChangedError`), since its cached targets belong to the old
pixels (:func:`expected_sizes`). Manifests written before ``etag``/``mtime`` existed read with those columns null;
their IDX rows recorded one record's bytes as ``size`` and are not size-checked.

Three sources are supported: IDX files (:func:`manifest_from_idx`), ImageFolder trees
(:func:`manifest_from_image_folder`) and Parquet/CSV lists of URIs (:func:`manifest_from_uri_list`).
:func:`write_manifest` serialises with fixed writer options so that the same table always gives the same
bytes; their SHA-256 (:func:`manifest_sha256`) is part of the cache key.

Without explicit ``storage_options``, manifests are read and written through :mod:`infra.storage` (endpoint and
timeouts from the environment, transient failures retried, local writes atomic). A manifest that is not a valid
Parquet table, or whose columns are wrong, raises :class:`ManifestError` naming the file. IDX files are read within
the bounds of :class:`stages.uri_policy.UriPolicy` (``max_idx_bytes``; gzip inflated only as far as the header
declares, see :mod:`stages.idx`); a bad one raises :class:`IdxError`.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
import os
import posixpath
from collections.abc import Sequence
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from infra import storage
from stages.idx import IDX_SCHEME, IdxError, idx_uri, parse_idx_uri, read_idx, read_idx_file  # noqa: F401
from stages.uri_policy import DEFAULT_POLICY, UriPolicy

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.int64()),
        pa.field("size", pa.int64()),
        pa.field("etag", pa.string()),
        pa.field("mtime", pa.float64()),
    ]
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class ManifestError(ValueError):
    """A manifest file that cannot be used: not Parquet, wrong columns or types, or a bad ``index`` column."""


# ----------------------------------------------------------------------------------------------- IDX files
def default_labels_path(images_path: str | os.PathLike) -> Path | None:
    """Return the labels file that pairs with an images IDX file (``*-images-idx3-*`` → ``*-labels-idx1-*``).

    Returns:
        The path if the name follows the MNIST convention and the file exists, else None.
    """
    images_path = Path(images_path)
    name = images_path.name.replace("images-idx3", "labels-idx1")
    candidate = images_path.with_name(name)
    return candidate if name != images_path.name and candidate.exists() else None


def manifest_from_idx(
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike | None = None,
    limit: int | None = None,
) -> pa.Table:
    """Build a manifest over the records of an IDX images file.

    Args:
        images_path: The images IDX file (raw or .gz), e.g. ``train-images-idx3-ubyte.gz``.
        labels_path: The labels IDX file; by default the MNIST-named sibling of ``images_path`` if present,
            otherwise labels are null.
        limit: Keep only the first ``limit`` records (tests and demos use a few hundred).

    Returns:
        A manifest table (:data:`MANIFEST_SCHEMA`) with N = min(limit, records) rows; ``size`` is the IDX file's
        size in bytes as stored and ``mtime`` its modification time (the same for every row).

    Raises:
        ValueError: On a malformed IDX file, or when the labels count differs from the images count.
    """
    images, file_bytes = read_idx_file(images_path, expected_ndim=3)
    n_total = images.shape[0]
    labels_path = labels_path if labels_path is not None else default_labels_path(images_path)
    labels = None
    if labels_path is not None:
        labels = read_idx(labels_path, expected_ndim=1)
        if labels.shape[0] != n_total:
            raise ValueError(
                f"{labels_path}: holds {labels.shape[0]} labels but {images_path} holds {n_total} images"
            )
    else:
        log.warning("no labels file found for %s: labels are null", images_path)
    n = n_total if limit is None else min(int(limit), n_total)
    uris = [idx_uri(images_path, i) for i in range(n)]
    label_col = None if labels is None else labels[:n].astype(np.int64)
    mtime = _local_mtime(images_path)
    return _make_table(uris, label_col, [file_bytes] * n, mtimes=None if mtime is None else [mtime] * n)


def _local_mtime(path: str | os.PathLike) -> float | None:
    """Modification time of a local file, None for other URLs."""
    url = os.fspath(path)
    return os.stat(url.removeprefix("file://")).st_mtime if storage.is_local(url) else None


# ----------------------------------------------------------------------------------------- ImageFolder trees
def manifest_from_image_folder(
    root: str,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    storage_options: dict | None = None,
) -> pa.Table:
    """Build a manifest over an ImageFolder tree ``root/<class>/**/<image>`` (the ImageNet layout).

    Classes are the sub-directories of ``root`` sorted by name, label = position in that order (as
    torchvision's ImageFolder). Images are found recursively, filtered by extension (case-insensitive), and
    ordered by (label, path), so the order is deterministic.

    Args:
        root: fsspec URL or local path of the tree.
        extensions: Accepted file extensions (lower case, with dot).
        storage_options: Passed to the fsspec filesystem (e.g. S3 endpoint and credentials).

    Returns:
        A manifest table; ``uri`` values are full fsspec URLs (``file:///...`` for local files); ``size``, and
        ``etag`` or ``mtime``, from the listing.

    Raises:
        FileNotFoundError: If ``root`` has no class directory, or a class directory holds no image.
    """
    fs, root_path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    entries = fs.ls(root_path, detail=True)
    classes = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")
    if not classes:
        raise FileNotFoundError(f"{root}: no class directories found (expected root/<class>/<image>)")
    suffixes = tuple(e.lower() for e in extensions)
    uris: list[str] = []
    labels: list[int] = []
    stats: list[tuple[int, str | None, float | None]] = []
    empty = []
    for label, name in enumerate(classes):
        found = fs.find(posixpath.join(root_path.rstrip("/"), name), detail=True)
        files = sorted(
            (p, info) for p, info in found.items() if info["type"] == "file" and p.lower().endswith(suffixes)
        )
        if not files:
            empty.append(name)
        for path, info in files:
            uris.append(fs.unstrip_protocol(path))
            labels.append(label)
            stats.append(_source_fields(info))
    if empty:
        raise FileNotFoundError(f"{root}: no image files ({', '.join(suffixes)}) in class dirs {empty}")
    sizes, etags, mtimes = (list(col) for col in zip(*stats, strict=True))
    return _make_table(uris, np.asarray(labels, dtype=np.int64), sizes, etags, mtimes)


# -------------------------------------------------------------------------------------------- URI lists
def manifest_from_uri_list(
    list_url: str,
    stat: bool = True,
    storage_options: dict | None = None,
    policy: UriPolicy = DEFAULT_POLICY,
) -> pa.Table:
    """Build a manifest from a Parquet or CSV list of image URIs (column ``uri``, optional ``label``).

    The format is chosen by extension (``.parquet``/``.pq`` else CSV). URIs may use any fsspec scheme.
    Relative local paths are resolved against the directory of a local list file. Rows keep the list's order.

    Args:
        list_url: fsspec URL or local path of the list.
        stat: Fill ``size`` and ``etag``/``mtime`` by asking the filesystem about each URI (one request per URI);
            when False, they come from same-named columns of the list if any, else null.
        storage_options: Passed to fsspec for the list and for the stat calls.
        policy: Every URI is checked against it before any is asked about.

    Returns:
        A manifest table.

    Raises:
        ValueError: If the list has no ``uri`` column, an empty/null URI, or a non-integer ``label`` column.
        stages.uri_policy.UriPolicyError: A URI the policy refuses (nothing has been requested yet).
    """
    opts = storage_options or {}
    with fsspec.open(list_url, "rb", **opts) as f:
        data = f.read()
    if list_url.lower().endswith((".parquet", ".pq")):
        table = pq.read_table(io.BytesIO(data))
    else:
        table = pacsv.read_csv(io.BytesIO(data))
    if "uri" not in table.column_names:
        raise ValueError(f"{list_url}: no 'uri' column (columns: {table.column_names})")
    uri_col = table.column("uri")
    if not pa.types.is_string(uri_col.type) and not pa.types.is_large_string(uri_col.type):
        raise ValueError(f"{list_url}: column 'uri' must hold strings, found {uri_col.type}")
    if uri_col.null_count or pc.any(pc.equal(uri_col, "")).as_py():
        raise ValueError(f"{list_url}: column 'uri' has empty or null entries")
    base = _local_dir(list_url)
    uris = [_resolve(u, base) for u in uri_col.to_pylist()]
    labels = _label_column(table, list_url)
    for uri in uris:
        policy.check(uri)
    if stat:
        return _make_table(uris, labels, *_stat_sources(uris, opts))
    given = {name: table.column(name) if name in table.column_names else None for name in ("size", "etag", "mtime")}
    return _make_table(uris, labels, given["size"], given["etag"], given["mtime"])


def _label_column(table: pa.Table, list_url: str) -> pa.Array | None:
    """The ``label`` column cast to int64, None if absent; ValueError naming the file if not integers."""
    if "label" not in table.column_names:
        return None
    col = table.column("label")
    if pa.types.is_null(col.type):
        return None
    if not pa.types.is_integer(col.type):
        raise ValueError(f"{list_url}: column 'label' must hold integers (class indices), found {col.type}")
    return col.cast(pa.int64())


def _local_dir(url: str) -> str | None:
    """Directory of a local list file (for resolving relative paths), None for remote lists."""
    fs, path = fsspec.core.url_to_fs(url)
    return os.path.dirname(path) if isinstance(fs, LocalFileSystem) else None


def _resolve(uri: str, base: str | None) -> str:
    """Make a relative local path absolute against ``base``; leave URLs and absolute paths unchanged."""
    if "://" in uri or os.path.isabs(uri) or base is None:
        return uri
    return os.path.normpath(os.path.join(base, uri))


def _stat_sources(uris: Sequence[str], storage_options: dict) -> tuple[list, list, list]:
    """(sizes, etags, mtimes) of the URIs (one filesystem info call per URI; see :func:`_source_fields`).

    Raises:
        FileNotFoundError: Naming the first URI that does not exist.
    """
    found = []
    for uri in uris:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        found.append(_source_fields(fs.info(path)))
    sizes, etags, mtimes = (list(col) for col in zip(*found, strict=True)) if found else ([], [], [])
    return sizes, etags, mtimes


def _source_fields(info: dict) -> tuple[int, str | None, float | None]:
    """(size, etag, mtime) of an fsspec info dict: the ETag where the store has one (S3 ``ETag``, GCS ``etag``),
    else the modification time where it has one (local files); the other is None."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return int(info["size"]), str(etag).strip('"'), None
    mtime = info.get("mtime")
    if isinstance(mtime, datetime.datetime):
        mtime = mtime.timestamp()
    return int(info["size"]), None, float(mtime) if isinstance(mtime, int | float) else None


# ------------------------------------------------------------------------------------------ table and bytes
def _make_table(uris: Sequence[str], labels, sizes, etags=None, mtimes=None) -> pa.Table:
    """Assemble a manifest table; ``labels``, ``sizes``, ``etags`` and ``mtimes`` may be None (all null)."""
    n = len(uris)
    index = pa.array(np.arange(n, dtype=np.int64))
    cols = [index, pa.array(uris, type=pa.string())]
    for values, f in zip((labels, sizes, etags, mtimes), list(MANIFEST_SCHEMA)[2:], strict=True):
        if values is None:
            cols.append(pa.nulls(n, f.type))
        elif isinstance(values, pa.ChunkedArray | pa.Array):
            cols.append(values.cast(f.type))
        else:
            cols.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(cols, schema=MANIFEST_SCHEMA)


def expected_sizes(table: pa.Table) -> list[int | None]:
    """Per row of a manifest, the size in bytes its source must still have when read (None: not checked).

    That is the ``size`` column, except for IDX rows of manifests made before ``mtime`` was recorded: their ``size``
    was one record's bytes, not the file's, so rows with an ``idx://`` URI and a null ``mtime`` are not checked.
    """
    uris, sizes = table.column("uri").to_pylist(), table.column("size").to_pylist()
    mtimes = table.column("mtime").to_pylist() if "mtime" in table.column_names else [None] * len(uris)
    return [None if size is None or (uri.startswith(IDX_SCHEME) and mtime is None) else int(size)
            for uri, size, mtime in zip(uris, sizes, mtimes, strict=True)]


def validate_manifest(table: pa.Table, source: str = "manifest") -> pa.Table:
    """Check a manifest's columns and ``index`` = 0..N-1; return it with the canonical schema.

    Raises:
        ManifestError: Naming ``source`` and the offending column.
    """
    for name in ("index", "uri"):
        if name not in table.column_names:
            raise ManifestError(f"{source}: missing column {name!r} (columns: {table.column_names})")
    n = table.num_rows
    index = table.column("index").to_numpy(zero_copy_only=False)
    if not np.array_equal(index, np.arange(n)):
        raise ManifestError(f"{source}: column 'index' must be 0..{n - 1} in order")
    if table.column("uri").null_count:
        raise ManifestError(f"{source}: column 'uri' has null entries")
    cols = []
    for f in MANIFEST_SCHEMA:
        if f.name not in table.column_names:
            cols.append(pa.nulls(n, f.type))
            continue
        try:
            cols.append(table.column(f.name).cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ManifestError(f"{source}: column {f.name!r} must hold {f.type}, found "
                                f"{table.column(f.name).type} ({err})") from None
    return pa.Table.from_arrays(cols, schema=MANIFEST_SCHEMA)


def manifest_to_bytes(table: pa.Table) -> bytes:
    """Serialise a manifest to Parquet with fixed options (zstd, one row group): same table → same bytes."""
    buf = io.BytesIO()
    pq.write_table(
        validate_manifest(table).replace_schema_metadata(None),
        buf,
        compression="zstd",
        compression_level=3,
        row_group_size=max(table.num_rows, 1),
        use_dictionary=False,
        write_statistics=True,
    )
    return buf.getvalue()


def manifest_sha256(data: bytes) -> str:
    """Hex SHA-256 of serialised manifest bytes (the ``manifest.sha256`` field of the cache attribute)."""
    return hashlib.sha256(data).hexdigest()


def write_manifest(table: pa.Table, url: str, storage_options: dict | None = None) -> str:
    """Write a manifest as Parquet to any fsspec URL.

    Returns:
        The hex SHA-256 of the bytes written.
    """
    data = manifest_to_bytes(table)
    if storage_options is None:
        storage.write_bytes(url, data)
    else:
        with fsspec.open(url, "wb", **storage_options) as f:
            f.write(data)
    digest = manifest_sha256(data)
    log.info("wrote manifest %s: %d rows, %d bytes, sha256 %s", url, table.num_rows, len(data), digest)
    return digest


def read_manifest(url: str, storage_options: dict | None = None) -> tuple[pa.Table, str]:
    """Read and validate a Parquet manifest.

    Returns:
        (table, hex SHA-256 of the file's bytes).

    Raises:
        FileNotFoundError: No manifest at ``url``.
        ManifestError: The file is not a Parquet table or fails :func:`validate_manifest`.
        infra.storage.StorageError: The store failed (after retries) or refused access.
    """
    if storage_options is None:
        data = storage.read_bytes(url)
    else:
        with fsspec.open(url, "rb", **storage_options) as f:
            data = f.read()
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"{url}: not a Parquet manifest ({len(data)} bytes): {err}") from None
    return validate_manifest(table, source=url), manifest_sha256(data)
