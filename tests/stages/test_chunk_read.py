"""stages.cache.chunk_read: the readers that decode a cache's chunks themselves give exactly zarr's reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from stages.cache import create_or_open, open_cache
from stages.cache.chunk_read import ShardReader, UnitChunkReader, direct_reader
from stages.cache.spec import CacheFormatError
from tests.fixtures.local_cache import small_spec, write_small_cache

N, U = 40, 16  # 3 units, the last one partial


@pytest.mark.parametrize("compressor", ["shuffle", "none"])
def test_read_samples_equals_zarr_for_any_rows_and_views(tmp_path: Path, compressor: str) -> None:
    url, spec = str(tmp_path / "c"), small_spec(N, unit_size=U)
    create_or_open(url, spec, compressor=compressor)
    write_small_cache(url, spec)
    cache, plain = open_cache(url), zarr.open_group(url, mode="r")
    assert isinstance(cache._direct["features"], ShardReader)
    assert isinstance(cache._direct["valid"], UnitChunkReader)
    rng = np.random.default_rng(0)
    for idx in (np.array([39, 0, 5, 5, 17]), rng.integers(0, N, 50), np.arange(N)[::-1], np.arange(N)):
        vid = rng.integers(0, 2, idx.size)
        got = cache.read_samples(idx, views=vid)
        for name in ("features", "attn_logits", "topk_index", "views"):
            want = np.stack([plain[name][i, v] for i, v in zip(idx.tolist(), vid.tolist(), strict=True)])
            assert getattr(got, name).tobytes() == want.tobytes(), name
        assert np.array_equal(got.valid, plain["valid"][:][idx])


def test_missing_objects_read_as_zeros_and_a_damaged_shard_index_is_refused(tmp_path: Path) -> None:
    url, spec = str(tmp_path / "c"), small_spec(N, unit_size=U)
    cache = create_or_open(url, spec)
    write_small_cache(url, spec)
    shard = Path(url, "features", *cache.unit_objects(1)[0].split("/")[1:])
    shard.unlink()
    for name in ("valid", "topk_index"):
        Path(url, name, *cache.unit_objects(1)[list(cache._arrays).index(name)].split("/")[1:]).unlink()
    got = open_cache(url).read_samples([20, 3], views=[0, 1], check_complete=False)
    assert not got.features[0].any() and got.features[1].any() and got.valid.tolist() == [False, True]
    damaged = Path(url, "features", *cache.unit_objects(0)[0].split("/")[1:])
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match="damaged shard index"):
        open_cache(url).read_samples([3], views=[0], check_complete=False)


def test_layouts_it_does_not_know_are_left_to_zarr(tmp_path: Path) -> None:
    arr = zarr.create_array(str(tmp_path / "a"), shape=(8, 2, 4), dtype="float16", chunks=(4, 2, 4),
                            shards=(8, 2, 4))  # an inner chunk holding both views
    big = zarr.create_array(str(tmp_path / "b"), shape=(8, 4), dtype=">i4", chunks=(4, 4))
    assert direct_reader(arr) is None and direct_reader(big) is None
