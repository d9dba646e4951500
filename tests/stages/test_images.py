"""Image reading: IDX records, encoded files via fsspec, mode conversion, BadImageError reasons, failures."""

from __future__ import annotations

import os
import pickle
import time
import zlib

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFile

from stages.images import (
    FAILURES_SCHEMA,
    REASONS,
    BadImageError,
    FailureRecord,
    ImageSource,
    SourceChangedError,
    failures_table,
)
from stages.manifest import idx_uri, manifest_from_image_folder
from stages.uri_policy import UriPolicy, UriPolicyError
from tests.fixtures.data import FMNIST_TRAIN_IMAGES, FOLDER_CLASSES, encode, parse_idx_gz
from tests.fixtures.limits import address_space_cap


def test_idx_record_is_exact_bytes(fmnist_dir):
    ref = parse_idx_gz(fmnist_dir / FMNIST_TRAIN_IMAGES)
    grey, rgb = ImageSource(1), ImageSource(3)
    for record in (0, 1, 59999):
        uri = idx_uri(fmnist_dir / FMNIST_TRAIN_IMAGES, record)
        one = grey.read(uri)
        assert one.shape == (28, 28, 1) and one.dtype == np.uint8
        assert one[:, :, 0].tobytes() == ref[record].tobytes()
        three = rgb(uri)
        assert three.shape == (28, 28, 3) and three.flags.c_contiguous
        assert all(three[:, :, c].tobytes() == ref[record].tobytes() for c in range(3))
    with pytest.raises(BadImageError) as err:
        grey.read(idx_uri(fmnist_dir / FMNIST_TRAIN_IMAGES, 60000))
    assert err.value.reason == "missing"


def test_idx_missing_file(tmp_path):
    with pytest.raises(BadImageError) as err:
        ImageSource(1).read(idx_uri(tmp_path / "nope.gz", 0))
    assert err.value.reason == "missing"


def test_image_folder_files_decode(image_folder):
    table = manifest_from_image_folder(str(image_folder))
    src = ImageSource(3)
    shapes = set()
    for uri in table.column("uri").to_pylist():
        img = src.read(uri)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        shapes.add(img.shape)
    assert shapes == {(28, 28, 3), (42, 56, 3)}
    png = image_folder / FOLDER_CLASSES[0] / "a0.png"
    expected = np.asarray(Image.open(png))
    np.testing.assert_array_equal(ImageSource(1).read(str(png))[:, :, 0], expected)
    np.testing.assert_array_equal(src.read(f"file://{png}"), np.repeat(expected[..., None], 3, axis=2))


def test_rgb_to_grey_uses_luma():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200
    data = encode(Image.fromarray(rgb), "PNG")
    with fsspec.open("memory://img/red.png", "wb") as f:
        f.write(data)
    grey = ImageSource(1, policy=UriPolicy(allowed_schemes=("memory",))).read("memory://img/red.png")
    assert grey.shape == (4, 5, 1)
    assert int(grey[0, 0, 0]) == round(200 * 299 / 1000)


@pytest.mark.parametrize(
    "key",
    [
        "empty-jpg",
        "truncated-png",
        "truncated-jpg",
        "not_an_image-text.jpg",
        "too_small-1x1.png",
        "too_small-1x40.png",
        "unsupported_mode-float.tif",
        "missing-file",
    ],
)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_bad_images_raise_with_reason(bad_images, key, in_chans):
    uri = str(bad_images[key])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(BadImageError) as err:
        ImageSource(in_chans).read(uri)
    assert err.value.reason == key.split("-")[0]
    assert err.value.reason in REASONS
    assert err.value.uri == uri and uri in str(err.value)


def test_bad_image_in_directory_is_missing(tmp_path):
    with pytest.raises(BadImageError) as err:
        ImageSource(3).read(str(tmp_path))
    assert err.value.reason == "missing"


def test_load_truncated_images_flag_is_refused(bad_images, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        ImageSource(3).read(str(bad_images["truncated-png"]))


@pytest.mark.parametrize("name", ["i16.png", "rgba.png", "la.png", "palette.png", "cmyk.tif"])
def test_odd_modes_convert(odd_mode_images, name):
    path, expected = odd_mode_images[name]
    rgb = ImageSource(3).read(str(path))
    assert rgb.shape == expected.shape and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, expected)
    grey = ImageSource(1).read(str(path))
    assert grey.shape == (*expected.shape[:2], 1)
    luma = np.asarray(Image.fromarray(expected).convert("L"))
    np.testing.assert_array_equal(grey[:, :, 0], luma)


def test_source_pickles_and_errors_pickle(image_folder):
    src = ImageSource(3, storage_options={"anon": True})
    png = str(image_folder / FOLDER_CLASSES[1] / "a0.png")
    src.read(png)
    clone = pickle.loads(pickle.dumps(src))
    assert clone._filesystems == {} and clone.storage_options == {"anon": True}
    np.testing.assert_array_equal(clone.read(png), src.read(png))
    err = pickle.loads(pickle.dumps(BadImageError("u", "empty", "zero bytes")))
    assert (err.uri, err.reason, err.message) == ("u", "empty", "zero bytes")
    with pytest.raises(ValueError):
        BadImageError("u", "weird")
    with pytest.raises(ValueError):
        ImageSource(2)


def test_failures_table():
    errors = [BadImageError("b.png", "truncated", "image file is truncated"), BadImageError("a", "empty")]
    records = [errors[0].to_record(7), errors[1].to_record(3)]
    table = failures_table(records)
    assert table.schema.equals(FAILURES_SCHEMA)
    assert table.to_pylist() == [
        {"index": 3, "uri": "a", "reason": "empty", "message": ""},
        {"index": 7, "uri": "b.png", "reason": "truncated", "message": "image file is truncated"},
    ]
    assert failures_table([]).num_rows == 0
    assert failures_table([(1, "x", "missing", "gone")])[0].type == pa.int64()
    assert records[0] == FailureRecord(7, "b.png", "truncated", "image file is truncated")


# ------------------------------------------------------------------------------------------------ input bounds
def test_dev_zero_is_refused_at_once_as_not_a_regular_file():
    started = time.monotonic()
    with address_space_cap(), pytest.raises(BadImageError) as err:  # an unbounded read ends in MemoryError instead
        ImageSource(3).read("file:///dev/zero")
    assert time.monotonic() - started < 1.0
    assert err.value.reason == "missing" and "not a regular file (a character device)" in err.value.message
    with pytest.raises(BadImageError, match="a character device"):
        ImageSource(3).read("/dev/zero")


@pytest.mark.timeout(20)  # opening a FIFO for reading would block until a writer comes
def test_a_fifo_is_never_opened_for_a_blocking_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(BadImageError, match=r"not a regular file \(a FIFO\)"):
        ImageSource(3).read(str(fifo))


def test_a_file_over_max_image_bytes_is_too_large_without_being_read(tmp_path):
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GiB of nothing, no disk used
    started = time.monotonic()
    with address_space_cap(), pytest.raises(BadImageError) as err:
        ImageSource(3).read(str(huge))
    assert time.monotonic() - started < 1.0
    assert err.value.reason == "too_large"
    assert err.value.message == f"{3 * 2**30} bytes, more than data.max_image_bytes = {64 * 2**20}"
    png = tmp_path / "small.png"
    png.write_bytes(encode(Image.new("L", (40, 40), 9), "PNG"))
    size = png.stat().st_size
    assert ImageSource(1, policy=UriPolicy(max_image_bytes=size)).read(str(png)).shape == (40, 40, 1)
    with pytest.raises(BadImageError, match=rf"too_large \({size} bytes, more than data.max_image_bytes = {size - 1}"):
        ImageSource(1, policy=UriPolicy(max_image_bytes=size - 1)).read(str(png))


def test_remote_reads_stop_after_max_image_bytes():
    data = encode(Image.new("L", (64, 64), 3), "PNG") + bytes(5000)  # trailing bytes Pillow ignores
    with fsspec.open("memory://bounds/a.png", "wb") as f:
        f.write(data)
    with fsspec.open("memory://bounds/empty.png", "wb") as f:
        f.write(b"")
    policy = UriPolicy(allowed_schemes=("memory",), max_image_bytes=len(data) - 1)
    with pytest.raises(BadImageError, match=rf"more than {len(data) - 1} bytes, more than data.max_image_bytes"):
        ImageSource(1, policy=policy).read("memory://bounds/a.png")
    assert ImageSource(1, policy=UriPolicy(allowed_schemes=("memory",))).read("memory://bounds/a.png").shape == \
        (64, 64, 1)
    with pytest.raises(BadImageError, match="empty"):
        ImageSource(1, policy=policy).read("memory://bounds/empty.png")


def test_images_over_max_image_pixels_are_refused_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    path.write_bytes(encode(Image.new("L", (40, 30), 5), "PNG"))
    assert ImageSource(1, policy=UriPolicy(max_image_pixels=1200)).read(str(path)).shape == (30, 40, 1)
    with pytest.raises(BadImageError, match=r"too_large \(40x30 px, more than data.max_image_pixels = 1199\)"):
        ImageSource(1, policy=UriPolicy(max_image_pixels=1199)).read(str(path))
    # A 100000 x 100000 PNG header over a few bytes of data: refused on the header, nothing decoded.
    bomb = encode(Image.new("L", (8, 8), 0), "PNG")
    ihdr = bomb.index(b"IHDR")
    head = b"IHDR" + (100_000).to_bytes(4, "big") * 2 + bomb[ihdr + 12: ihdr + 17]
    bomb = bomb[: ihdr] + head + zlib.crc32(head).to_bytes(4, "big") + bomb[ihdr + 21:]
    (tmp_path / "bomb.png").write_bytes(bomb)
    started = time.monotonic()
    with address_space_cap(), pytest.raises(BadImageError, match="too_large"):
        ImageSource(1, policy=UriPolicy(max_image_pixels=10**6)).read(str(tmp_path / "bomb.png"))
    assert time.monotonic() - started < 1.0


def test_refused_uris_raise_policy_errors_not_skips(tmp_path):
    with pytest.raises(UriPolicyError, match=r"scheme 'http' is not allowed"):
        ImageSource(3).read("http://example.com/a.png")
    with pytest.raises(UriPolicyError, match="metadata"):
        ImageSource(3, policy=UriPolicy(allowed_schemes=("http",))).read("http://169.254.169.254/latest/a.png")
    with pytest.raises(BadImageError, match="missing"):  # no filesystem serves it: a missing image, as before
        ImageSource(3).read("nosuchscheme://bucket/x.png")


def test_an_image_whose_size_changed_is_refused_naming_it(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("L", (20, 20), 5), "PNG"))
    size = path.stat().st_size
    assert ImageSource(1).read(str(path), expected_size=size).shape == (20, 20, 1)
    path.write_bytes(encode(Image.new("L", (20, 20), 5), "PNG") + b"\0" * 7)  # same pixels, 7 bytes longer
    with pytest.raises(SourceChangedError, match=rf"{path}: the source changed .*manifest size {size} bytes, "
                                                 rf"found {size + 7} bytes"):
        ImageSource(1).read(str(path), expected_size=size)
    with pytest.raises(SourceChangedError, match=rf"found {size + 7} bytes"):  # larger than the bound: not read
        ImageSource(1, policy=UriPolicy(max_image_bytes=size + 1)).read(str(path), expected_size=size)
    with fsspec.open("memory://changed/a.png", "wb") as f:
        f.write(path.read_bytes())
    memory = ImageSource(1, policy=UriPolicy(allowed_schemes=("memory",)))
    with pytest.raises(SourceChangedError, match=rf"found more than {size} bytes"):
        memory.read("memory://changed/a.png", expected_size=size)
    with pytest.raises(SourceChangedError, match=rf"found {size + 7} bytes"):
        memory.read("memory://changed/a.png", expected_size=size + 8)
    err = SourceChangedError(str(SourceChangedError("msg", "u")))
    assert str(err) == "msg"  # constructible from its message alone: a DataLoader worker re-raises it as its type
