"""stages.idx: IDX files read within their byte bound; endless files and gzip bombs end in IdxError at once."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from stages.idx import IdxError, idx_uri, read_idx, read_idx_file
from stages.images import ImageSource, SourceChangedError
from stages.uri_policy import UriPolicy
from tests.fixtures.limits import address_space_cap, gzip_bomb, idx_bytes


def assert_fast_idx_error(path: str, pattern: str) -> None:
    """Both entry points (read_idx and an idx:// URI) end in IdxError matching ``pattern`` within a second, under an
    address-space cap (an unbounded read or inflate would end in MemoryError instead)."""
    for read in (lambda: read_idx(path, expected_ndim=3), lambda: ImageSource(1).read(idx_uri(path, 0))):
        started = time.monotonic()
        with address_space_cap(), pytest.raises(IdxError, match=pattern):
            read()
        assert time.monotonic() - started < 1.0


def test_dev_zero_is_not_an_idx_file() -> None:
    assert_fast_idx_error("/dev/zero", r"^/dev/zero: not a regular file \(a character device\), not an IDX file$")


def test_a_gzip_bomb_declaring_a_huge_shape_is_refused_on_its_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb-images-idx3-ubyte.gz"
    size = gzip_bomb(path, (2**20, 64, 64), 4 * 2**30)  # 4 GiB of zeros behind a header that says so
    assert size < 8 * 2**20
    assert_fast_idx_error(str(path), r"declares shape \(1048576, 64, 64\) \(4294967312 bytes\), more than "
                                     rf"data.max_idx_bytes = {2**30}")


def test_a_gzip_bomb_behind_a_small_header_is_refused_past_the_declared_bytes(tmp_path: Path) -> None:
    path = tmp_path / "trail-images-idx3-ubyte.gz"
    gzip_bomb(path, (10, 28, 28), 4 * 2**30)
    assert_fast_idx_error(str(path), r"header says shape \(10, 28, 28\) but the file has more than 7840 bytes")


def test_max_idx_bytes_bounds_the_stored_and_the_declared_bytes(tmp_path: Path) -> None:
    images = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    raw, packed = tmp_path / "a-images-idx3-ubyte", tmp_path / "b-images-idx3-ubyte.gz"
    raw.write_bytes(idx_bytes(images.shape, images.tobytes()))
    packed.write_bytes(gzip.compress(raw.read_bytes()))
    total = 16 + images.size
    for path in (raw, packed):
        got, stored = read_idx_file(path, expected_ndim=3, max_bytes=total)
        np.testing.assert_array_equal(got, images)
        assert stored == path.stat().st_size and not got.flags.writeable
    with pytest.raises(IdxError, match=rf"\(136 bytes\), more than data.max_idx_bytes = {total - 1}"):
        read_idx(raw, max_bytes=total - 1)
    big = tmp_path / "big-images-idx3-ubyte"
    with open(big, "wb") as f:
        f.truncate(2 * 2**20)  # sparse
    with pytest.raises(IdxError, match=r"holds more than data.max_idx_bytes = 1048576 bytes"):
        read_idx(big, max_bytes=2**20)
    with pytest.raises(IdxError, match=rf"\(136 bytes\), more than data.max_idx_bytes = {total - 1}"):
        read_idx(packed, max_bytes=total - 1)
    source = ImageSource(1, policy=UriPolicy(max_idx_bytes=total - 1))
    with pytest.raises(IdxError, match="max_idx_bytes"):
        source.read(idx_uri(raw, 0))


def test_gzip_streams_are_read_exactly(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 255, (3, 4, 4), dtype=np.uint8)
    data = idx_bytes(images.shape, images.tobytes())
    two_members = tmp_path / "two.gz"
    two_members.write_bytes(gzip.compress(data[:20]) + gzip.compress(data[20:]))
    np.testing.assert_array_equal(read_idx(two_members), images)
    trailing = tmp_path / "trailing.gz"
    trailing.write_bytes(gzip.compress(data) + b"\0\0\0\0")  # padding after the last member, as gzip ignores
    np.testing.assert_array_equal(read_idx(trailing), images)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(data)[:-30])
    with pytest.raises(IdxError, match=r"truncated.gz: IDX header says shape \(3, 4, 4\) but the file has \d+ bytes"):
        read_idx(truncated)
    corrupt = bytearray(gzip.compress(data, compresslevel=0))
    corrupt[12] ^= 0xFF  # the deflate block header
    (tmp_path / "corrupt.gz").write_bytes(bytes(corrupt))
    with pytest.raises(IdxError, match=r"corrupt\.gz: corrupt gzip data"):
        read_idx(tmp_path / "corrupt.gz")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(IdxError, match="declares 3 dimensions but ends after 0"):
        read_idx(tmp_path / "short")


def test_an_idx_file_whose_size_changed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c-images-idx3-ubyte"
    path.write_bytes(idx_bytes((2, 3, 3), bytes(18)))
    uri = idx_uri(path, 1)
    assert ImageSource(1).read(uri, expected_size=34).shape == (3, 3, 1)
    with pytest.raises(SourceChangedError, match=rf"{uri}: the source changed .*manifest size 35 bytes, found 34 "
                                                 "bytes in the IDX file"):
        ImageSource(1).read(uri, expected_size=35)
