"""stages.cache: format, key, completion markers, local and S3 round trips."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import zarr

from infra import storage
from stages import cache as cache_mod
from stages.cache import UnitIncompleteError, create_or_open, gather_failures, gather_rows, open_cache
from stages.cache.spec import CacheMismatchError, CacheSpec, cache_key, diff_specs
from stages.images import FailureRecord

N, V, L, C, H, K, U = 10, 2, 16, 8, 2, 3, 4
META = {"zarr.json", *(f"{a}/zarr.json" for a in cache_mod.ARRAYS)}


def make_spec(**changes: object) -> CacheSpec:
    spec = CacheSpec(
        checkpoint="s3://models/base.pth", checkpoint_sha256="a" * 64,
        timm_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": C, "depth": 2, "num_heads": H, "in_chans": 1},
        k_max=K, output_size=16, mean=(0.286,), std=(0.353,), view_seed=7, views_per_image=V,
        manifest_uri="file:///data/manifest.parquet", manifest_sha256="b" * 64, n_images=N, num_patches=L,
        embed_dim=C, num_heads=H, base_forward_macs_per_view=12345, unit_size=U,
    )
    return dataclasses.replace(spec, **changes)


def unit_data(unit: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(unit)
    valid = np.ones(n, bool)
    valid[0] = unit % 2 == 0
    return {
        "features": rng.standard_normal((n, V, L, C)).astype(np.float16),
        "attn_logits": rng.standard_normal((n, V, K + 1, H, L)).astype(np.float16),
        "topk_index": rng.integers(0, L, (n, V, K)).astype(np.int16),
        "views": rng.integers(0, 28, (n, V, 5)).astype(np.int32),
        "valid": valid,
    }


def write(cache: cache_mod.TargetCache, unit: int, **kw: object) -> dict:
    n = len(cache.unit_range(unit))
    fails = [FailureRecord(cache.unit_range(unit)[0], f"idx://x#{unit}", "truncated", "cut short")] if unit % 2 else []
    return cache.write_unit(unit, **unit_data(unit, n), failures=fails, **kw)


@pytest.fixture(params=["local", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "cache") if request.param == "local" else request.getfixturevalue("s3_url")


def test_round_trip_is_byte_identical(url: str) -> None:
    cache = create_or_open(url, make_spec())
    assert cache.n_units == 3 and list(cache.unit_range(2)) == [8, 9]
    for u in range(cache.n_units):
        write(cache, u)
    reader = open_cache(url, make_spec())
    assert reader.complete_units() == [0, 1, 2]
    for u in range(3):
        got, want = reader.read_unit(u), unit_data(u, len(reader.unit_range(u)))
        for name in cache_mod.ARRAYS:
            assert getattr(got, name).dtype == want[name].dtype
            assert getattr(got, name).tobytes() == want[name].tobytes(), name
    batch = reader.read_samples([9, 0, 5], views=[1, 0, 1])
    assert batch.features.shape == (3, L, C)
    assert batch.features[0].tobytes() == unit_data(2, 2)["features"][1, 1].tobytes()
    assert batch.attn_logits[2].tobytes() == unit_data(1, 4)["attn_logits"][1, 1].tobytes()
    assert reader.read_samples([5, 1]).topk_index.shape == (2, V, K)
    table = reader.failures()
    assert table.column_names == ["index", "uri", "reason", "message"]
    assert table.column("index").to_pylist() == [4]
    summary = reader.summary()
    assert summary.images_complete == N and summary.units_complete == 3
    assert summary.raw_bytes_per_view == L * C * 2 + (K + 1) * H * L * 2 + K * 2 + 5 * 4
    assert summary.stored_bytes > 0 and summary.compression_ratio == pytest.approx(
        summary.raw_bytes / summary.stored_bytes)


def test_each_unit_owns_its_objects(url: str) -> None:
    cache = create_or_open(url, make_spec())
    before = set(storage.list_objects(url))
    assert before == META
    owned = {}
    for u in range(cache.n_units):
        write(cache, u)
        now = set(storage.list_objects(url))
        owned[u] = now - before
        before = now
        assert owned[u] == set(cache.unit_objects(u))
    assert not set.intersection(*owned.values())


def test_attributes_readable_with_plain_zarr(url: str, moto_endpoint: str) -> None:
    spec = make_spec()
    create_or_open(url, spec)
    opts = {"endpoint_url": moto_endpoint} if url.startswith("s3://") else None
    group = zarr.open_group(url, mode="r", storage_options=opts)
    attrs = group.attrs["tec_cache"]
    assert set(attrs) == {"format_version", "key", "base_model", "targets", "preprocess", "views", "manifest",
                          "flops", "shapes"}
    assert attrs["format_version"] == 1 and attrs["key"] == cache_key(spec)
    assert attrs["base_model"]["timm_kwargs"]["embed_dim"] == C
    assert set(attrs["preprocess"]) == {"output_size", "crop_scale", "crop_ratio", "interpolation", "mean", "std"}
    assert attrs["targets"] == {"last_layers": 2, "k_max": K, "precision": "float32"}
    assert attrs["views"] == {"seed": 7, "per_image": V}
    assert attrs["shapes"] == {"n_images": N, "views_per_image": V, "num_patches": L, "embed_dim": C,
                               "num_heads": H, "unit_size": U}
    assert "testing" not in str(attrs)
    assert group["features"].shape == (N, V, L, C) and group["features"].dtype == np.float16
    assert group["attn_logits"].shape == (N, V, K + 1, H, L)
    assert group["topk_index"].dtype == np.int16 and group["views"].dtype == np.int32
    assert group["valid"].dtype == np.bool_
    assert CacheSpec.from_attrs(attrs) == spec


def test_failure_before_marker_leaves_unit_incomplete_and_rerun_rewrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = str(tmp_path / "cache")
    cache = create_or_open(url, make_spec())
    real_write = storage.write_bytes
    seen_at_marker = []

    def crash_on_marker(target: str, data: bytes, *args: object) -> None:
        if target.endswith(".done"):
            seen_at_marker.append(set(storage.list_objects(url)))
            raise RuntimeError("killed before the marker")
        real_write(target, data, *args)

    monkeypatch.setattr(storage, "write_bytes", crash_on_marker)
    with pytest.raises(RuntimeError):
        write(cache, 1)
    objects = cache.unit_objects(1)
    assert set(objects[:-1]) <= seen_at_marker[0]
    assert cache.complete_units() == [] and not cache.is_complete(1)
    with pytest.raises(UnitIncompleteError):
        cache.read_unit(1)
    with pytest.raises(UnitIncompleteError):
        cache.read_samples([5])
    monkeypatch.setattr(storage, "write_bytes", real_write)
    marker = write(cache, 1)
    assert cache.complete_units() == [1]
    assert marker["n_images"] == 4 and marker["n_failures"] == 1 and marker["n_valid"] == 3
    assert set(marker["stored_bytes"]) == set(objects[:-1])
    assert cache.read_unit(1).features.tobytes() == unit_data(1, 4)["features"].tobytes()
    assert write(cache, 1) == marker  # a complete unit is skipped


def test_valid_block_size_and_completeness_are_asked_of_the_cache(tmp_path: Path) -> None:
    cache = create_or_open(str(tmp_path / "cache"), make_spec())
    write(cache, 0)
    write(cache, 2)
    assert cache.missing_units() == [1] and cache.missing_units([0, 2]) == []
    cache.require_complete([0, 2])
    with pytest.raises(UnitIncompleteError, match=r"units \[1\] are not complete"):
        cache.require_complete()
    with pytest.raises(UnitIncompleteError, match=r"units \[1\] are not complete; finish the extraction"):
        open_cache(cache.url).valid()
    write(cache, 1)
    reader = open_cache(cache.url)
    want = np.concatenate([unit_data(u, len(reader.unit_range(u)))["valid"] for u in range(3)])
    got = reader.valid()
    assert got.dtype == bool and got.shape == (N,) and got.tolist() == want.tolist()
    assert reader.block_size == zarr.open_group(str(tmp_path / "cache"), mode="r")["features"].chunks[0] == U


def test_overwrite_rewrites_a_complete_unit(tmp_path: Path) -> None:
    cache = create_or_open(str(tmp_path / "c"), make_spec())
    first = write(cache, 0)
    again = write(cache, 0, overwrite=True, extra={"forward_seconds": 1.5})
    assert again["forward_seconds"] == 1.5 and again["sha256"] == first["sha256"]


def _write_in_child(url: str, unit: int) -> None:
    cache = open_cache(url, make_spec(), read_only=False)
    write(cache, unit)


def test_two_processes_write_disjoint_objects(url: str) -> None:
    cache = create_or_open(url, make_spec())
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_in_child, args=(url, u)) for u in (0, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert cache.complete_units() == [0, 2]
    assert set(storage.list_objects(url)) == META | set(cache.unit_objects(0)) | set(cache.unit_objects(2))
    assert not set(cache.unit_objects(0)) & set(cache.unit_objects(2))
    for u in (0, 2):
        assert cache.read_unit(u).attn_logits.tobytes() == unit_data(u, len(cache.unit_range(u)))[
            "attn_logits"].tobytes()
    assert gather_failures(url).num_rows == 0


BYTE_CHANGES = {
    "checkpoint_sha256": "c" * 64, "timm_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": C, "depth": 3,
                                                   "num_heads": H, "in_chans": 1},
    "k_max": 4, "output_size": 24, "mean": (0.5,), "std": (0.25,), "view_seed": 8, "views_per_image": 3,
    "manifest_sha256": "d" * 64, "n_images": 11, "num_patches": 25, "embed_dim": 16, "num_heads": 4,
    "last_layers": 1, "crop_scale": (0.3, 1.0), "crop_ratio": (0.5, 2.0), "interpolation": "bilinear",
    "codec": "int8", "checkpoint_key": "student", "max_image_bytes": 1000, "max_image_pixels": 4096,
}
NEUTRAL_CHANGES = {"checkpoint": "file:///elsewhere.pth", "manifest_uri": "s3://b/m.parquet",
                   "base_forward_macs_per_view": 1, "unit_size": 2, "precision": "bfloat16"}


def test_key_covers_every_field_that_changes_bytes() -> None:
    base = make_spec()
    covered = set(BYTE_CHANGES) | set(NEUTRAL_CHANGES)
    assert covered == {f.name for f in dataclasses.fields(CacheSpec)}
    for name, value in BYTE_CHANGES.items():
        changed = make_spec(**{name: value})
        assert cache_key(changed) != cache_key(base), name
        assert len(diff_specs(base, changed)) >= 1, name
    for name, value in NEUTRAL_CHANGES.items():
        assert cache_key(make_spec(**{name: value})) == cache_key(base), name
    assert cache_key(make_spec(mean=[0.286], crop_scale=[0.2, 1])) == cache_key(base)


def test_precision_is_recorded_and_another_precision_is_refused(tmp_path: Path) -> None:
    url = str(tmp_path / "cache")
    create_or_open(url, make_spec(precision="bfloat16"))
    assert open_cache(url).spec.precision == "bfloat16"
    with pytest.raises(CacheMismatchError, match=r"targets\.precision: cache was extracted in bfloat16, this job "
                                                 r"computes float32 \(set extract\.precision=bfloat16"):
        create_or_open(url, make_spec(precision="float32"))
    with pytest.raises(CacheMismatchError, match=r"targets\.precision"):
        open_cache(url, make_spec(precision="float32"))
    # caches written before the field existed were all extracted in float32 (no GPU had run the code)
    attrs = make_spec().to_attrs()
    del attrs["targets"]["precision"]
    assert CacheSpec.from_attrs(attrs).precision == "float32"


def test_diff_names_fields_with_both_values() -> None:
    lines = diff_specs(make_spec(k_max=3), make_spec(k_max=2, view_seed=9))
    assert lines == ["targets.k_max: cache has 3, config asks 2", "views.seed: cache has 7, config asks 9"]
    kw = make_spec().timm_kwargs
    lines = diff_specs(make_spec(), make_spec(timm_kwargs={**kw, "depth": 4, "qkv_bias": False}))
    assert lines == ["base_model.timm_kwargs.depth: cache has 2, config asks 4",
                     "base_model.timm_kwargs.qkv_bias: cache has <absent>, config asks false"]


def test_mismatch_refused_with_field_names(tmp_path: Path) -> None:
    url = str(tmp_path / "cache")
    create_or_open(url, make_spec())
    with pytest.raises(CacheMismatchError, match=r"targets\.k_max: cache has 3, config asks 2") as info:
        create_or_open(url, make_spec(k_max=2, interpolation="bilinear"))
    assert 'preprocess.interpolation: cache has "bicubic", config asks "bilinear"' in info.value.differences
    with pytest.raises(CacheMismatchError):
        open_cache(url, make_spec(n_images=12))
    reopened = create_or_open(url, make_spec(unit_size=2, checkpoint="file:///moved.pth"))
    assert reopened.unit_size == U and reopened.spec == make_spec()


def test_bad_shapes_are_refused(tmp_path: Path) -> None:
    cache = create_or_open(str(tmp_path / "c"), make_spec())
    data = unit_data(0, 4)
    data["features"] = data["features"][:, :, :, :4]
    with pytest.raises(ValueError, match="features: expected shape"):
        cache.write_unit(0, **data)
    with pytest.raises(IndexError):
        cache.unit_range(3)
    with pytest.raises(PermissionError):
        open_cache(str(tmp_path / "c")).write_unit(0, **unit_data(0, 4))


def test_gather_equals_numpy_indexing_for_any_index_pattern(tmp_path):
    """Chunk-run slice reads give exactly ``data[idx]`` for unsorted, repeated and gapped indices."""
    data = np.arange(37 * 3 * 4, dtype=np.float16).reshape(37, 3, 4)
    arr = zarr.create_array(str(tmp_path / "a"), shape=data.shape, dtype=data.dtype, chunks=(4, 1, 4),
                            shards=(8, 3, 4))
    arr[...] = data
    rng = np.random.default_rng(0)
    for idx in (np.array([36, 0, 5, 5, 17]), rng.integers(0, 37, 50), np.arange(37)[::-1], np.array([], np.int64)):
        assert np.array_equal(gather_rows(arr, idx), data[idx])
        assert np.array_equal(gather_rows(arr, idx, 2), data[idx, 2])
