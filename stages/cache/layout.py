"""The target cache's layout (format_version 1; 2 for quantised targets): its arrays, their chunking and
compression, and their creation.

Arrays, with N images, V views, L patches, C channels, H heads, K = k_max:

    features     (N, V, L, C)        float16  mean of the last blocks' patch tokens, before the final norm
    attn_logits  (N, V, K+1, H, L)   float16  pre-softmax logits, rows [cls, top-K patches] x patch keys
    topk_index   (N, V, K)           int16    patch index of each selected row, descending head-mean cls logit
    views        (N, V, 5)           int32    crop top, left, height, width (source pixels), flip
    valid        (N,)                bool     False for images that could not be read (see the failures table)

Bookkeeping objects: ``units/<u>.done`` (JSON marker, written last) and ``failures/<u>.parquet`` (columns
index, uri, reason, message).

A work unit is images ``[u*U, min((u+1)*U, N))``. Every array is chunked along N at U, so unit u owns exactly one
object per array (``features/c/<u>/0/0/0`` ...) and no two units share an object. The two big arrays use the
sharding codec: the shard is the unit (U, V, ...); its inner chunks hold ``inner`` images of ONE view,
(inner, 1, L, C), with ``inner`` the largest divisor of U whose chunk stays <= 8 MiB raw (ViT-B, U=64: 16 images =
4.8 MB for features, 64 images = 4.8 MB for attn_logits). A writer sends one PUT per shard; a reader taking one
view per image fetches whole inner chunks of several MB (zarr 3.1 issues one range request per inner chunk plus one
per shard index), not one 300 KB sample per request. Every array is compressed losslessly with Blosc zstd-3,
byte-shuffle and 256 KiB blocks by default (``compressor="bitshuffle"`` stays selectable for data where it wins).

A quantised target codec (format_version 2, :mod:`stages.cache.codecs`) stores ``features`` and ``attn_logits`` as
int8 / uint8 codes of the same shapes, plus side arrays ``features_scale`` (N, V, L), ``attn_logits_scale`` and
``attn_logits_offset`` (N, V, K+1, H), float16, each sharded and inner-chunked along N exactly like its parent
(:func:`stored_shapes`). The inner chunk is sized by STORED bytes, so int8 features get twice the images per chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from infra import storage
from stages.cache import codecs
from stages.cache.spec import ATTR_NAME, CacheSpec

logger = logging.getLogger(__name__)

ARRAYS = ("features", "attn_logits", "topk_index", "views", "valid")
SHARDED = ("features", "attn_logits")
TARGET_INNER_CHUNK_BYTES = 8 * 1024 * 1024
_DESCRIPTIONS = {
    "features": "mean of the last `last_layers` blocks' patch tokens before the final norm, (image, view, patch, "
    "channel)",
    "attn_logits": "last-block pre-softmax q.k/sqrt(d) logits, rows [cls, top-k_max patches], patch keys only",
    "topk_index": "patch index of attn_logits rows 1..k_max, descending by head-mean cls logit",
    "views": "crop top, left, height, width in source pixels, flip (0/1)",
    "valid": "False where the source image could not be read; see failures/*.parquet",
    "features_scale": "per-token dequantisation scale of features: features = codes * scale",
    "attn_logits_scale": "per-row dequantisation scale of attn_logits: logits = codes * scale + offset",
    "attn_logits_offset": "per-row dequantisation offset of attn_logits: logits = codes * scale + offset",
}



@dataclass(frozen=True)
class TargetBatch:
    """Targets for a set of samples (leading axes: n images, then V views unless a view was picked).

    Attributes:
        indices: (n,) int64 image indices.
        features: (n, [V,] L, C) float16.
        attn_logits: (n, [V,] K+1, H, L) float16.
        topk_index: (n, [V,] K) int16.
        views: (n, [V,] 5) int32.
        valid: (n,) bool.
    """

    indices: np.ndarray
    features: np.ndarray
    attn_logits: np.ndarray
    topk_index: np.ndarray
    views: np.ndarray
    valid: np.ndarray



def array_shapes(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of every cache array for ``spec``."""
    n, v, k, h, p, c = (spec.n_images, spec.views_per_image, spec.k_max, spec.num_heads, spec.num_patches,
                        spec.embed_dim)
    return {
        "features": ((n, v, p, c), "float16"),
        "attn_logits": ((n, v, k + 1, h, p), "float16"),
        "topk_index": ((n, v, k), "int16"),
        "views": ((n, v, 5), "int32"),
        "valid": ((n,), "bool"),
    }


def stored_shapes(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of every STORED array for ``spec``'s codec, side arrays right after their parent; for
    ``float16`` the same as :func:`array_shapes`."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (shape, dtype) in array_shapes(spec).items():
        for stored, (sub_shape, sub_dtype) in codecs.stored_arrays(spec.codec, name, shape).items():
            out[stored] = (sub_shape, sub_dtype or dtype)
    return out


def raw_bytes_per_view(spec: CacheSpec) -> int:
    """Decoded bytes of one (image, view) sample across all per-view arrays."""
    shapes = array_shapes(spec)
    return sum(int(np.prod(shape[2:])) * np.dtype(dt).itemsize for name, (shape, dt) in shapes.items()
               if name != "valid")


def inner_images(unit_size: int, bytes_per_image_view: int, target: int = TARGET_INNER_CHUNK_BYTES) -> int:
    """Largest divisor of ``unit_size`` whose (d, 1, ...) inner chunk stays within ``target`` bytes (at least 1)."""
    best = 1
    for d in range(1, unit_size + 1):
        if unit_size % d == 0 and d * bytes_per_image_view <= target:
            best = d
    return best


COMPRESSORS = ("shuffle", "bitshuffle", "none")


def make_compressor(name: str = "shuffle") -> BloscCodec | None:
    """Lossless codec for every array: Blosc zstd-3 with byte- or bit-shuffle and 256 KiB blocks, or none."""
    if name not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {COMPRESSORS}, got {name!r}")
    if name == "none":
        return None
    return BloscCodec(cname="zstd", clevel=3, shuffle=name, blocksize=1 << 18)


def _chunking(name: str, shapes: dict[str, tuple[tuple[int, ...], str]], unit: int) -> dict[str, Any]:
    """Chunks (and shards) of stored array ``name``: a side array is chunked along N like its parent."""
    shape = shapes[name][0]
    unit_block = (unit, *shape[1:])
    parent = codecs.parent_of(name)
    if parent not in SHARDED:
        return {"chunks": unit_block, "shards": None}
    parent_shape, parent_dtype = shapes[parent]
    per_image_view = int(np.prod(parent_shape[2:])) * np.dtype(parent_dtype).itemsize
    return {"shards": unit_block, "chunks": (inner_images(unit, per_image_view), 1, *shape[2:])}


_DIMS = {
    "features": ("image", "view", "patch", "channel"),
    "attn_logits": ("image", "view", "row", "head", "key"),
    "topk_index": ("image", "view", "rank"),
    "views": ("image", "view", "field"),
    "valid": ("image",),
    "features_scale": ("image", "view", "patch"),
    "attn_logits_scale": ("image", "view", "row", "head"),
    "attn_logits_offset": ("image", "view", "row", "head"),
}


def create_arrays(url: str, spec: CacheSpec, compressor: str) -> None:
    """Write the arrays' metadata, then the group attribute (its presence means "created").

    Safe against a concurrent creator of the same spec: an array that already exists with exactly the metadata we
    would write is kept (with whatever unit data it already holds); one with other metadata (a half-finished creation
    for another spec, which cannot hold complete units since the group attribute was never written) is replaced.
    """
    try:
        group = zarr.open_group(storage.zarr_store(url), mode="a", zarr_format=3)
    except zarr.errors.ContainsGroupError:  # a concurrent creator made the group between our check and our write
        group = zarr.open_group(storage.zarr_store(url), mode="r+", zarr_format=3)
    wanted = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    shapes = stored_shapes(spec)
    for name, (shape, dtype) in shapes.items():
        kwargs = {
            "shape": shape, "dtype": dtype, "fill_value": False if dtype == "bool" else 0,
            "compressors": make_compressor(compressor), "dimension_names": _DIMS[name],
            "attributes": {"description": _DESCRIPTIONS[name]}, **_chunking(name, shapes, spec.unit_size),
        }
        try:
            group.create_array(name, overwrite=False, **kwargs)
        except zarr.errors.ContainsArrayError:
            if group[name].metadata.to_dict() == wanted.create_array(name, **kwargs).metadata.to_dict():
                logger.info("%s: array %s already created (concurrent creator): kept", url, name)
                continue
            group.create_array(name, overwrite=True, **kwargs)
    group.update_attributes({ATTR_NAME: spec.to_attrs()})
    logger.info("created target cache %s (key %s, %d images, unit %d)", url, spec.key[:12], spec.n_images,
                spec.unit_size)



def gather_rows(arr: zarr.Array, idx: np.ndarray, view: int | None = None) -> np.ndarray:
    """``arr[idx]`` (or ``arr[idx, view]``) by reading the touched chunks as contiguous slices.

    Fetches exactly the chunks an orthogonal index read would, whole, but through zarr's slice path, which is much
    faster than ``oindex`` with an index array on sharded arrays.
    """
    chunk = arr.chunks[0]
    if idx.size == 0:
        return np.empty((0, *arr.shape[1 if view is None else 2:]), dtype=arr.dtype)
    touched = np.unique(idx // chunk)
    breaks = np.flatnonzero(np.diff(touched) != 1) + 1
    parts, starts = [], []
    for run in np.split(touched, breaks):
        start, stop = int(run[0]) * chunk, min(int(run[-1] + 1) * chunk, arr.shape[0])
        parts.append(arr[start:stop] if view is None else arr[start:stop, view])
        starts.append(start)
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    block = np.concatenate(parts) if len(parts) > 1 else parts[0]
    run_of = np.searchsorted(np.asarray(starts), idx, side="right") - 1
    return block[offsets[run_of] + idx - np.asarray(starts)[run_of]]

