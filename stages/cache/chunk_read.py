"""Readers that decode a cache's chunks themselves, for :meth:`stages.cache.store.TargetCache.read_samples`.

zarr's read path costs the train reader most of its time at ViT-B shapes (docs/benchmarks.md#reader): a sharded
read decodes each inner chunk into a chunk buffer and copies it twice, and a read of the small unsharded arrays
costs milliseconds of machinery for a few KB. These readers fetch the same bytes through the array's own store
(so the node-local tier and its byte counters see every request), with zarr's byte-range requests, and Blosc-decode
each chunk with numcodecs straight into its destination. They read only the layout :mod:`stages.cache.layout`
writes (:func:`direct_reader` returns None for anything else, which zarr then reads): shards with the index at the
end (bytes + CRC32C, checked), inner chunks of one view whole along the trailing axes, and chunks of bytes
(little-endian) with or without Blosc. Objects of a complete unit never change, so shard indexes and the decoded
small arrays are kept; a missing object reads as the fill value, as zarr reads it, and is not kept.
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from stages.cache.spec import CacheFormatError

_NO_CHUNK = 2**64 - 1  # a shard index entry of an inner chunk that was never written
_HELD_UNITS = 64  # decoded units of the small unsharded arrays a reader keeps


class ShardReader:
    """Inner chunks of one view of a sharded array, each Blosc frame decompressed into its final place; each shard's
    index read once (CRC32C checked) and kept."""

    def __init__(self, arr: zarr.Array, blosc: bool) -> None:
        self.arr, self.rows = arr, int(arr.chunks[0])
        self.grid = tuple(int(s) // int(c) for s, c in zip(arr.shards, arr.chunks, strict=True))
        self.codec = Blosc() if blosc else None
        self._index: dict[int, np.ndarray] = {}

    @classmethod
    def of(cls, arr: zarr.Array) -> ShardReader | None:
        """A reader for ``arr`` if it is sharded as the layout writes (index at the end: bytes + CRC32C; inner
        chunks of one view, whole along the trailing axes, bytes little-endian [+ Blosc]); None otherwise."""
        codecs = arr.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or sys.byteorder != "little":
            return None
        shard, inner = codecs[0], codecs[0].codecs
        if (shard.index_location != ShardingCodecIndexLocation.end or len(inner) not in (1, 2)
                or [type(c) for c in shard.index_codecs] != [BytesCodec, Crc32cCodec]
                or not _little(inner[0]) or (len(inner) == 2 and not isinstance(inner[1], BloscCodec))
                or arr.chunks[1] != 1 or tuple(arr.chunks[2:]) != tuple(arr.shape[2:])):
            return None
        return cls(arr, blosc=len(inner) == 2)

    def _key(self, shard: int) -> str:
        return self.arr.metadata.encode_chunk_key((shard,) + (0,) * (self.arr.ndim - 1))

    async def _load_index(self, shard: int) -> np.ndarray:
        """(chunks along N, V, 2) (offset, length) of one shard's inner chunks; all absent for a missing object
        (read as the fill value, as zarr does; not kept: its unit may still be written)."""
        if shard in self._index:
            return self._index[shard]
        n = int(np.prod(self.grid))
        buf = await (self.arr.store_path / self._key(shard)).get(default_buffer_prototype(),
                                                                  SuffixByteRequest(16 * n + 4))
        if buf is None:
            return np.full((*self.grid[:2], 2), _NO_CHUNK, np.uint64)
        raw = buf.as_numpy_array()
        crc = np.uint32(google_crc32c.value(raw[:-4].tobytes())).tobytes()
        if raw.size != 16 * n + 4 or crc != raw[-4:].tobytes():
            raise CacheFormatError(f"{self.arr.store_path}/{self._key(shard)}: damaged shard index (CRC32C)")
        self._index[shard] = raw[:-4].view("<u8").reshape(*self.grid[:2], 2)
        return self._index[shard]

    async def _fetch(self, chunks: list[int], view: int) -> list[Any]:
        shards = sorted({c // self.grid[0] for c in chunks})
        index = dict(zip(shards, await asyncio.gather(*(self._load_index(s) for s in shards)), strict=True))
        prototype = default_buffer_prototype()

        async def one(c: int) -> Any:
            offset, length = (int(x) for x in index[c // self.grid[0]][c % self.grid[0], view])
            if offset == _NO_CHUNK:
                return None
            return await (self.arr.store_path / self._key(c // self.grid[0])).get(
                prototype, RangeByteRequest(offset, offset + length))

        return list(await asyncio.gather(*(one(c) for c in chunks)))

    def read_into(self, chunks: list[int], view: int, out: np.ndarray) -> None:
        """Decode inner chunks ``chunks`` (chunk indices along N) of ``view`` into ``out``, (len(chunks)·rows, ...)
        of the array's dtype, C-contiguous, chunk after chunk."""
        for k, buf in enumerate(sync(self._fetch(chunks, view))):
            dest = out[k * self.rows : (k + 1) * self.rows]
            if buf is None:
                dest[...] = self.arr.fill_value
            elif self.codec is not None:
                self.codec.decode(buf.as_numpy_array(), out=dest)
            else:
                dest.reshape(-1).view(np.uint8)[:] = buf.as_numpy_array()

    def rows_of(self, idx: np.ndarray, vid: np.ndarray) -> np.ndarray:
        """``array[idx[j], vid[j]]`` for every j: every touched (view, chunk) decoded once into one buffer, then
        the rows gathered from it in the order asked (no gather when that is the buffer's order).

        Args:
            idx / vid: (n,) image indices and their views.

        Returns:
            (n, ...) rows of the array's dtype.
        """
        rows = self.rows
        pairs, where = np.unique(np.stack([vid, idx // rows], 1), axis=0, return_inverse=True)
        block = np.empty((pairs.shape[0] * rows, *self.arr.shape[2:]), dtype=self.arr.dtype)
        for v in np.unique(pairs[:, 0]).tolist():
            at = np.flatnonzero(pairs[:, 0] == v)  # consecutive: pairs are sorted by view first
            self.read_into(pairs[at, 1].tolist(), v, block[at[0] * rows : (at[-1] + 1) * rows])
        pos = where.reshape(-1) * rows + idx % rows
        if pos.size == block.shape[0] and np.array_equal(pos, np.arange(pos.size)):
            return block
        return block[pos]


class UnitChunkReader:
    """The unsharded arrays (``topk_index``, ``views``, ``valid``: one chunk per unit, a few KB) read as whole
    objects, the last :data:`_HELD_UNITS` units kept decoded."""

    def __init__(self, arr: zarr.Array, blosc: bool) -> None:
        self.arr, self.rows = arr, int(arr.chunks[0])
        self.codec = Blosc() if blosc else None
        self._held: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def of(cls, arr: zarr.Array) -> UnitChunkReader | None:
        """A reader for ``arr`` if it is chunked by unit along N only, bytes (little-endian) [+ Blosc]; else None."""
        codecs = arr.metadata.codecs
        if (arr.shards is not None or tuple(arr.chunks[1:]) != tuple(arr.shape[1:]) or sys.byteorder != "little"
                or len(codecs) not in (1, 2) or not _little(codecs[0])
                or (len(codecs) == 2 and not isinstance(codecs[1], BloscCodec))):
            return None
        return cls(arr, blosc=len(codecs) == 2)

    async def _get(self, unit: int) -> Any:
        key = self.arr.metadata.encode_chunk_key((unit,) + (0,) * (self.arr.ndim - 1))
        return await (self.arr.store_path / key).get(default_buffer_prototype())

    async def _get_all(self, units: list[int]) -> list[Any]:
        return list(await asyncio.gather(*(self._get(u) for u in units)))

    def _units(self, units: list[int]) -> dict[int, np.ndarray]:
        missing = [u for u in units if u not in self._held]
        out = {u: self._held[u] for u in units if u in self._held}
        for u, buf in zip(missing, sync(self._get_all(missing)), strict=True):
            data = np.full((self.rows, *self.arr.shape[1:]), self.arr.fill_value, self.arr.dtype)
            if buf is not None:
                if self.codec is not None:
                    self.codec.decode(buf.as_numpy_array(), out=data)
                else:
                    data.reshape(-1).view(np.uint8)[:] = buf.as_numpy_array()
                self._held[u] = data
            out[u] = data
        for u in units:
            if u in self._held:
                self._held.move_to_end(u)
        while len(self._held) > _HELD_UNITS:
            self._held.popitem(last=False)
        return out

    def rows_of(self, idx: np.ndarray, vid: np.ndarray | None = None) -> np.ndarray:
        """``array[idx]`` (with ``vid``: ``array[idx[j], vid[j]]``)."""
        units = idx // self.rows
        data = self._units(np.unique(units).tolist())
        out = np.empty((idx.size, *self.arr.shape[1 if vid is None else 2:]), self.arr.dtype)
        for u, block in data.items():
            at = np.flatnonzero(units == u)
            out[at] = block[idx[at] % self.rows] if vid is None else block[idx[at] % self.rows, vid[at]]
        return out


def _little(codec: Any) -> bool:
    """Whether a zarr ``BytesCodec`` lays out little-endian bytes (or single bytes: no endianness)."""
    return isinstance(codec, BytesCodec) and (codec.endian is None or codec.endian.value == "little")


def direct_reader(arr: zarr.Array) -> ShardReader | UnitChunkReader | None:
    """The reader of ``arr`` (:class:`ShardReader` for a sharded array, :class:`UnitChunkReader` for one chunked by
    unit), or None when its layout is not one these readers know (zarr reads it)."""
    return ShardReader.of(arr) or UnitChunkReader.of(arr)
