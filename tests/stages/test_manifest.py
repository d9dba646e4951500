"""Manifest building (IDX, ImageFolder, URI lists), deterministic Parquet bytes, and clear errors."""

from __future__ import annotations

import gzip
import hashlib
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.manifest import (
    MANIFEST_SCHEMA,
    expected_sizes,
    idx_uri,
    manifest_from_idx,
    manifest_from_image_folder,
    manifest_from_uri_list,
    manifest_sha256,
    manifest_to_bytes,
    parse_idx_uri,
    read_idx,
    read_manifest,
    write_manifest,
)
from stages.uri_policy import UriPolicy, UriPolicyError
from tests.fixtures.data import FMNIST_TRAIN_IMAGES, FMNIST_TRAIN_LABELS, FOLDER_CLASSES, parse_idx_gz


def _write_idx(path, array: np.ndarray, compress: bool = False, magic: bytes | None = None) -> None:
    header = magic if magic is not None else bytes([0, 0, 8, array.ndim])
    data = header + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_idx_manifest_columns_and_labels(fmnist_dir):
    table = manifest_from_idx(fmnist_dir / FMNIST_TRAIN_IMAGES, limit=300)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.num_rows == 300
    assert table.column("index").to_pylist() == list(range(300))
    labels = parse_idx_gz(fmnist_dir / FMNIST_TRAIN_LABELS)[:300]
    np.testing.assert_array_equal(table.column("label").to_numpy(), labels)
    stat = (fmnist_dir / FMNIST_TRAIN_IMAGES).stat()
    assert set(table.column("size").to_pylist()) == {stat.st_size}  # the IDX file's size, every record
    assert set(table.column("mtime").to_pylist()) == {stat.st_mtime} and table.column("etag").null_count == 300
    uri = table.column("uri")[17].as_py()
    assert uri == f"idx://{fmnist_dir / FMNIST_TRAIN_IMAGES}#17"
    assert parse_idx_uri(uri) == (str(fmnist_dir / FMNIST_TRAIN_IMAGES), 17)


def test_read_idx_matches_manual_parse(fmnist_dir):
    ours = read_idx(fmnist_dir / FMNIST_TRAIN_IMAGES, expected_ndim=3)
    ref = parse_idx_gz(fmnist_dir / FMNIST_TRAIN_IMAGES)
    assert ours.shape == ref.shape == (60000, 28, 28)
    assert ours[12345].tobytes() == ref[12345].tobytes()


def test_raw_and_gz_idx_agree(tmp_path):
    images = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "x-images-idx3-ubyte", images)
    _write_idx(tmp_path / "x-labels-idx1-ubyte", labels)
    _write_idx(tmp_path / "y-images-idx3-ubyte.gz", images, compress=True)
    _write_idx(tmp_path / "y-labels-idx1-ubyte.gz", labels, compress=True)
    raw = manifest_from_idx(tmp_path / "x-images-idx3-ubyte")
    gz = manifest_from_idx(tmp_path / "y-images-idx3-ubyte.gz", limit=3)
    assert raw.column("label").to_pylist() == [3, 1, 4, 1, 5]
    assert gz.column("label").to_pylist() == [3, 1, 4]
    assert raw.column("size").to_pylist() == [(tmp_path / "x-images-idx3-ubyte").stat().st_size] * 5 == [16 + 60] * 5
    assert gz.column("size").to_pylist() == [(tmp_path / "y-images-idx3-ubyte.gz").stat().st_size] * 3
    np.testing.assert_array_equal(read_idx(tmp_path / "y-images-idx3-ubyte.gz"), images)


def test_idx_without_labels_file_gives_null_labels(tmp_path):
    _write_idx(tmp_path / "images.idx", np.zeros((4, 2, 2), np.uint8))
    table = manifest_from_idx(tmp_path / "images.idx")
    assert table.column("label").null_count == 4


def test_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte"
    _write_idx(bad, np.zeros((2, 2, 2), np.uint8), magic=b"\x00\x00\x09\x03")
    with pytest.raises(ValueError, match=r"bad-images-idx3-ubyte.*element type"):
        manifest_from_idx(bad)
    (tmp_path / "text-images-idx3-ubyte").write_bytes(b"hello world, not idx")
    with pytest.raises(ValueError, match=r"text-images-idx3-ubyte.*not an IDX"):
        manifest_from_idx(tmp_path / "text-images-idx3-ubyte")
    _write_idx(tmp_path / "z-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    _write_idx(tmp_path / "z-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match=r"z-labels-idx1-ubyte.*4 labels.*3 images"):
        manifest_from_idx(tmp_path / "z-images-idx3-ubyte")
    with pytest.raises(ValueError, match="dimensions"):
        manifest_from_idx(tmp_path / "z-images-idx3-ubyte", labels_path=tmp_path / "z-images-idx3-ubyte")


def test_image_folder_manifest(image_folder):
    table = manifest_from_image_folder(str(image_folder))
    assert table.schema.equals(MANIFEST_SCHEMA)
    uris = table.column("uri").to_pylist()
    labels = table.column("label").to_pylist()
    assert len(uris) == 4 * len(FOLDER_CLASSES)
    assert labels == sorted(labels) and set(labels) == set(range(len(FOLDER_CLASSES)))
    assert all(u.startswith("file:///") for u in uris)
    assert not any(u.endswith(".txt") for u in uris)
    assert any("/nested/" in u for u in uris) and any(u.endswith(".PNG") for u in uris)
    for uri, label, size in zip(uris, labels, table.column("size").to_pylist(), strict=True):
        fs, path = fsspec.core.url_to_fs(uri)
        assert path.split("/")[-2 if "/nested/" not in uri else -3] == FOLDER_CLASSES[label]
        assert fs.size(path) == size
    assert manifest_from_image_folder(f"file://{image_folder}").equals(table)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class directories"):
        manifest_from_image_folder(str(tmp_path))
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="cat"):
        manifest_from_image_folder(str(tmp_path))


def test_uri_list_parquet_csv_and_memory_scheme(tmp_path, image_folder):
    folder = manifest_from_image_folder(str(image_folder))
    uris = folder.column("uri").to_pylist()[:5]
    local = str(image_folder / FOLDER_CLASSES[0] / "a0.png")
    pq.write_table(pa.table({"uri": uris, "label": [0, 1, None, 3, 4]}), tmp_path / "list.parquet")
    table = manifest_from_uri_list(str(tmp_path / "list.parquet"))
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.column("uri").to_pylist() == uris
    assert table.column("label").to_pylist() == [0, 1, None, 3, 4]
    assert table.column("size").to_pylist() == folder.column("size").to_pylist()[:5]

    (tmp_path / "list.csv").write_text(f"uri,label\n{local},2\nrel/x.png,\n")
    csv = manifest_from_uri_list(str(tmp_path / "list.csv"), stat=False)
    assert csv.column("uri").to_pylist() == [local, str(tmp_path / "rel" / "x.png")]
    assert csv.column("label").to_pylist() == [2, None]
    assert csv.column("size").null_count == 2

    with fsspec.open("memory://lists/l.csv", "w") as f:
        f.write("uri\nmemory://imgs/a.png\n")
    with fsspec.open("memory://imgs/a.png", "wb") as f:
        f.write(b"12345")
    mem = manifest_from_uri_list("memory://lists/l.csv", policy=UriPolicy(allowed_schemes=("memory",)))
    assert mem.column("uri").to_pylist() == ["memory://imgs/a.png"]
    assert mem.column("size").to_pylist() == [5] and mem.column("label").null_count == 1


def test_uri_list_errors(tmp_path):
    (tmp_path / "nouri.csv").write_text("path,label\na.png,1\n")
    with pytest.raises(ValueError, match=r"nouri.csv.*'uri'"):
        manifest_from_uri_list(str(tmp_path / "nouri.csv"))
    (tmp_path / "strlabel.csv").write_text("uri,label\n/a.png,cat\n")
    with pytest.raises(ValueError, match=r"strlabel.csv.*'label'"):
        manifest_from_uri_list(str(tmp_path / "strlabel.csv"), stat=False)
    (tmp_path / "missing.csv").write_text(f"uri\n{tmp_path}/nope.png\n")
    with pytest.raises(FileNotFoundError):
        manifest_from_uri_list(str(tmp_path / "missing.csv"))


def test_parquet_bytes_and_sha_are_deterministic(tmp_path, image_folder):
    a = manifest_from_image_folder(str(image_folder))
    b = manifest_from_image_folder(str(image_folder))
    assert manifest_to_bytes(a) == manifest_to_bytes(b)
    sha_a = write_manifest(a, str(tmp_path / "a.parquet"))
    sha_b = write_manifest(b, f"file://{tmp_path}/b.parquet")
    assert sha_a == sha_b == manifest_sha256((tmp_path / "a.parquet").read_bytes())
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert sha_a == hashlib.sha256((tmp_path / "b.parquet").read_bytes()).hexdigest()
    assert write_manifest(a, "memory://m/manifest.parquet") == sha_a
    back, sha = read_manifest("memory://m/manifest.parquet")
    assert back.equals(a) and sha == sha_a
    changed = a.set_column(2, "label", pa.array([0] * a.num_rows, pa.int64()))
    assert manifest_sha256(manifest_to_bytes(changed)) != sha_a


def test_read_manifest_rejects_bad_index(tmp_path):
    pq.write_table(pa.table({"index": [0, 2], "uri": ["a", "b"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"m.parquet.*'index'"):
        read_manifest(str(tmp_path / "m.parquet"))
    pq.write_table(pa.table({"index": [0]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n.parquet.*'uri'"):
        read_manifest(str(tmp_path / "n.parquet"))


def test_idx_uri_roundtrip(tmp_path):
    uri = idx_uri(tmp_path / "a#b" / "f.gz", 42)
    assert parse_idx_uri(uri) == (str(tmp_path / "a#b" / "f.gz"), 42)
    for bad in ("idx:///x", "file:///x#1", "idx:///x#-1"):
        with pytest.raises(ValueError):
            parse_idx_uri(bad)


def test_image_folder_on_another_fsspec_scheme():
    for path in ("memory://tree/b/x.png", "memory://tree/a/y.jpg", "memory://tree/a/z.txt"):
        with fsspec.open(path, "wb") as f:
            f.write(b"abc")
    table = manifest_from_image_folder("memory://tree")
    assert [u.rsplit("/", 2)[-2:] for u in table.column("uri").to_pylist()] == [["a", "y.jpg"], ["b", "x.png"]]
    assert table.column("label").to_pylist() == [0, 1]
    with fsspec.open(table.column("uri")[1].as_py(), "rb") as f:
        assert f.read() == b"abc"


# ---------------------------------------------------------------------------------------- source identity columns
def test_manifests_record_size_and_mtime_of_local_sources(image_folder):
    table = manifest_from_image_folder(str(image_folder))
    assert table.column("etag").null_count == table.num_rows
    for uri, size, mtime in zip(*(table.column(c).to_pylist() for c in ("uri", "size", "mtime")), strict=True):
        stat = os.stat(uri.removeprefix("file://"))
        assert (size, mtime) == (stat.st_size, stat.st_mtime)
    assert expected_sizes(table) == table.column("size").to_pylist()


def test_manifests_record_the_etag_of_s3_sources(s3_url, s3_client, tmp_path):
    bucket = s3_url.split("/")[2]
    uris = []
    for name, body in (("a.png", b"12345"), ("b.png", b"abc")):
        s3_client.put_object(Bucket=bucket, Key=f"imgs/{name}", Body=body)
        uris.append(f"s3://{bucket}/imgs/{name}")
    (tmp_path / "list.csv").write_text("uri\n" + "\n".join(uris) + "\n")
    table = manifest_from_uri_list(str(tmp_path / "list.csv"))
    etags = [s3_client.head_object(Bucket=bucket, Key=f"imgs/{n}")["ETag"].strip('"') for n in ("a.png", "b.png")]
    assert table.column("etag").to_pylist() == etags and table.column("size").to_pylist() == [5, 3]
    assert table.column("mtime").null_count == 2
    pq.write_table(table.drop_columns(["index"]), tmp_path / "copy.parquet")
    back = manifest_from_uri_list(str(tmp_path / "copy.parquet"), stat=False)
    assert back.equals(table)  # a list carrying the columns keeps them without asking the store


def test_manifests_without_the_new_columns_stay_readable(tmp_path):
    legacy = pa.table({"index": pa.array([0, 1], pa.int64()), "uri": ["idx:///d/x-images-idx3-ubyte.gz#0", "/d/a.png"],
                       "label": pa.array([1, None], pa.int64()), "size": pa.array([784, 1234], pa.int64())})
    pq.write_table(legacy, tmp_path / "old.parquet")
    table, _ = read_manifest(str(tmp_path / "old.parquet"))
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert table.column("etag").null_count == 2 and table.column("mtime").null_count == 2
    assert expected_sizes(table) == [None, 1234]  # an old IDX row's size was one record's bytes: not checked


def test_uri_lists_are_checked_against_the_policy_before_any_request(tmp_path):
    cases = (("http://169.254.169.254/latest/meta-data/", UriPolicy(allowed_schemes=("file", "http")), "metadata"),
             ("ftp://example.com/a.png", UriPolicy(), "scheme 'ftp' is not allowed"))
    for uri, policy, fragment in cases:
        (tmp_path / "list.csv").write_text(f"uri\n{tmp_path}/a.png\n{uri}\n")
        for stat in (True, False):  # with stat=True, a request to the URI would be the harm
            with pytest.raises(UriPolicyError, match=fragment):
                manifest_from_uri_list(str(tmp_path / "list.csv"), stat=stat, policy=policy)
