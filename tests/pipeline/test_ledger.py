"""The FLOPs ledger: arithmetic against FlopCounterMode, round trips local and on S3, one object per writer."""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

import pytest
import torch
from timm.models.vision_transformer import Attention
from torch.utils.flop_counter import FlopCounterMode

from infra import storage
from pipeline import ledger
from pipeline.flops import base_macs_per_view
from stages.cache.spec import CacheSpec
from stages.extract import ExtractResult
from tec_model import build_vit, vit_kwargs

BASE_KW = vit_kwargs("vit_pico_patch4_32", in_chans=1)


def measured_base_macs() -> int:
    """MACs of one tiny base forward by FlopCounterMode (FLOPs / 2), non-fused attention: independent of the
    analytic formula the ledger uses."""
    vit = build_vit(BASE_KW).eval()
    for m in vit.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vit.forward_features(torch.randn(1, 1, 32, 32))
    return counter.get_total_flops() // 2


def make_spec(**changes: Any) -> CacheSpec:
    spec = CacheSpec(
        checkpoint="file:///m/base.pth", checkpoint_sha256="a" * 64, timm_kwargs=BASE_KW, k_max=6, output_size=32,
        mean=(0.286,), std=(0.353,), view_seed=7, views_per_image=2, manifest_uri="file:///m/manifest.parquet",
        manifest_sha256="b" * 64, n_images=40, num_patches=64, embed_dim=48, num_heads=3,
        base_forward_macs_per_view=base_macs_per_view(BASE_KW), unit_size=16,
    )
    return dataclasses.replace(spec, **changes)


def make_result(spec: CacheSpec, written: list[int], skipped: list[int], images: int) -> ExtractResult:
    return ExtractResult(
        cache_url="x", cache_key=spec.key, units_total=3, units_written=written, units_skipped=skipped,
        images_written=images, views_written=images * spec.views_per_image, wall_seconds=12.5, work_seconds=10.0,
        device_seconds={"cpu": 7.25, "cuda": 1.5}, stored_bytes=300_000,
    )


@pytest.fixture(params=["local", "s3"])
def cache_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    return request.getfixturevalue("s3_url") if request.param == "s3" else str(tmp_path / "cache")


def test_extraction_and_runs_round_trip(cache_url: str) -> None:
    spec = make_spec()
    macs = measured_base_macs()
    row = ledger.record_extraction(cache_url, make_result(spec, [0, 1, 2], [], 40), spec)
    assert row["base_macs_per_view"] == macs and row["base_macs_total"] == 80 * macs
    ledger.record_run(cache_url, "sweep-a", "/runs/sweep-a", "cache", views_served=200, bytes_read=9_000,
                      train_macs=123_456, wall_seconds=3.0, epochs=5.0, base_macs_per_view=macs)
    ledger.record_run(cache_url, "online-b", "/runs/online-b", "online", views_served=80, bytes_read=0,
                      train_macs=7, wall_seconds=1.0, epochs=2.0, base_macs_per_view=macs)
    ext, runs = ledger.read_ledger(cache_url)
    assert ext.schema.equals(ledger.EXTRACT_SCHEMA) and runs.schema.equals(ledger.RUN_SCHEMA)
    (e,) = ext.to_pylist()
    assert (e["images"], e["views"], e["n_images"], e["views_per_image"]) == (40, 80, 40, 2)
    assert e["base_macs_total"] == 80 * macs and e["cache_key"] == spec.key
    assert e["bytes_written"] == e["cache_stored_bytes"] == 300_000  # every unit written by this run
    assert e["device_seconds"] == 8.75 and json.loads(e["device_seconds_json"]) == {"cpu": 7.25, "cuda": 1.5}
    got = {r["run_name"]: r for r in runs.to_pylist()}
    assert got["sweep-a"]["base_macs_avoided"] == 200 * macs  # served views × one base forward each
    assert got["online-b"]["base_macs_avoided"] == 0  # the base model ran every step
    assert got["sweep-a"]["bytes_read"] == 9_000 and got["sweep-a"]["train_macs"] == 123_456
    macs_columns = {f.name for t in (ext, runs) for f in t.schema if "macs" in f.name}
    assert macs_columns == {"base_macs_per_view", "base_macs_total", "base_macs_avoided", "train_macs"}
    assert all(t.schema.field(n).type == "int64" for t in (ext, runs) for n in macs_columns if n in t.column_names)
    assert b"FLOPs = 2" in ext.schema.metadata[b"units"]


def test_rewriting_a_run_replaces_its_object(tmp_path: Any) -> None:
    url = str(tmp_path / "cache")
    for views in (100, 250):  # e.g. the run resumed and finished
        ledger.record_run(url, "r/1", "/runs/r1", "cache", views, 0, 0, 1.0, 1.0, base_macs_per_view=10)
    _, runs = ledger.read_ledger(url)
    assert runs.num_rows == 1 and runs.column("views_served").to_pylist() == [250]
    assert runs.column("base_macs_avoided").to_pylist() == [2_500]
    assert sorted(storage.list_objects(ledger.ledger_url(url))) == ["run-r_1.parquet"]


def test_partial_extraction_share_and_noop(tmp_path: Any) -> None:
    url, spec = str(tmp_path / "cache"), make_spec()
    row = ledger.record_extraction(url, make_result(spec, [2], [0, 1], 8), spec)
    assert row["bytes_written"] == 100_000 and row["cache_stored_bytes"] == 300_000  # 1 of 3 units
    assert row["base_macs_total"] == 16 * spec.base_forward_macs_per_view
    noop = ledger.record_extraction(url, make_result(spec, [], [0, 1, 2], 0), spec)
    assert noop["url"] is None
    ext, _ = ledger.read_ledger(url)
    assert ext.num_rows == 1


def test_concurrent_extractors_share_the_cache_bytes_by_the_units_each_wrote(tmp_path: Any) -> None:
    """Two jobs on an empty 10-unit cache, 3 and 7 units each: each ends seeing the whole cache's stored bytes, and
    the other's units as ``units_by_others``; their rows add up to the cache's size, not twice it."""
    url, spec, stored = str(tmp_path / "cache"), make_spec(), 1_000_000
    units = list(range(10))
    for mine in (units[:3], units[3:]):
        others = [u for u in units if u not in mine]
        result = ExtractResult(cache_url=url, cache_key=spec.key, units_total=10, units_written=mine,
                               units_by_others=others, images_written=16 * len(mine),
                               views_written=32 * len(mine), stored_bytes=stored)
        ledger.record_extraction(url, result, spec)
    ext, _ = ledger.read_ledger(url)
    assert sorted(ext.column("bytes_written").to_pylist()) == [300_000, 700_000]
    assert sum(ext.column("bytes_written").to_pylist()) == stored == ext.column("cache_stored_bytes")[0].as_py()


def test_concurrent_writers_write_disjoint_objects(cache_url: str) -> None:
    spec, errors = make_spec(), []

    def extract_writer(i: int) -> None:
        try:
            ledger.record_extraction(cache_url, make_result(spec, [i], [], 16), spec)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def run_writer(i: int) -> None:
        try:
            ledger.record_run(cache_url, f"run{i}", f"/r/{i}", "cache", 10 * (i + 1), 0, 0, 1.0, 1.0, 5)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(4) for f in (extract_writer, run_writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    objects = storage.list_objects(ledger.ledger_url(cache_url))
    assert len(objects) == 8 and len({k for k in objects if k.startswith("extract-")}) == 4
    ext, runs = ledger.read_ledger(cache_url)
    assert ext.num_rows == 4 and runs.num_rows == 4
    assert sorted(runs.column("base_macs_avoided").to_pylist()) == [50, 100, 150, 200]


def test_empty_ledger_and_bad_source(tmp_path: Any) -> None:
    ext, runs = ledger.read_ledger(str(tmp_path / "none"))
    assert ext.num_rows == runs.num_rows == 0 and "base_macs_total" in ext.column_names
    with pytest.raises(ValueError, match="target_source"):
        ledger.record_run(str(tmp_path), "x", "/r", "cached", 1, 0, 0, 0.0, 0.0, 1)
