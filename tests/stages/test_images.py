"""Image reading: IDX records, encoded files via fsspec, mode conversion, BadImageError reasons, failures."""

from __future__ import annotations

import pickle

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
    failures_table,
)
from stages.manifest import idx_uri, manifest_from_image_folder
from tests.fixtures.data import FMNIST_TRAIN_IMAGES, FOLDER_CLASSES, encode, parse_idx_gz


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
    grey = ImageSource(1).read("memory://img/red.png")
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
