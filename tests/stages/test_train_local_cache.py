"""The training reader on a remote cache with a node-local cache (stages.train.data over stages.cache.local_tier),
on moto S3 behind the counting proxy; the run's network bytes in the ledger and the cost report."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from infra import storage
from pipeline import ledger
from pipeline.cost import cache_costs, object_store_bytes_with_local_cache
from stages.cache import open_cache
from stages.cache.local_tier import LocalCacheSettings
from stages.train.data import SamplePlan, TrainBatches, make_loader
from stages.views import Preprocess
from tests.faults.s3_faults import faulty_s3  # noqa: F401
from tests.fixtures.local_cache import V, data_bytes, small_spec, write_small_cache

N = 32


def test_second_epoch_batches_fetch_nothing_and_report_their_bytes(faulty_s3, fmnist_manifest,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    url, proxy = faulty_s3.url, faulty_s3.proxy
    spec = small_spec(N, output_size=32)
    sizes, features = write_small_cache(url, spec)
    plan = SamplePlan(valid=np.ones(N, bool), block_size=open_cache(url).block_size, views_per_image=V, seed=0,
                      global_batch=8, world_size=1)
    settings = LocalCacheSettings(dir=str(tmp_path / "local"), epochs=2)
    totals = []
    for epoch in range(2):
        proxy.stats.get_bytes.clear()
        ds = TrainBatches(plan, epoch, 0, 0, manifest_url=fmnist_manifest(N), preprocess=Preprocess.fashion_mnist(32),
                          in_chans=1, cache_url=url, checked_spec=spec, local_cache=settings)
        batches = list(make_loader(ds, num_workers=0))
        for b in batches:
            want = features[b["indices"].numpy(), b["views"].numpy()]
            assert b["features"].numpy().tobytes() == want.tobytes()
        totals.append((sum(b["object_store_bytes"] for b in batches), sum(b["local_cache_bytes"] for b in batches),
                       data_bytes(proxy)))
    (store0, local0, proxied0), (store1, local1, proxied1) = totals
    assert proxied0 == sum(sizes.values()) and proxied1 == 0, "the second epoch fetched targets from the store"
    assert store0 - store1 >= sum(sizes.values()) and local1 > 0 and local0 > 0
    # the run's counts in its ledger row; a row from before they were kept reads as unmeasured
    cache_dir = str(tmp_path / "ledgered")
    ledger.record_run(cache_dir, "with-local", "/runs/a", "cache", 64, 0, 0, 1.0, 2.0, 1,
                      object_store_bytes=store0 + store1, local_cache_bytes=local0 + local1)
    old = {name: [value] for name, value in {
        "run_name": "old", "run_dir": "/runs/old", "target_source": "cache", "views_served": 64,
        "base_macs_per_view": 1, "base_macs_avoided": 64, "bytes_read": 5, "train_macs": 0, "wall_seconds": 1.0,
        "epochs": 2.0, "timestamp": "20250101T000000.000000Z"}.items()}
    buf = io.BytesIO()
    pq.write_table(pa.table(old), buf)
    storage.write_bytes(storage.join(ledger.ledger_url(cache_dir), "run-old.parquet"), buf.getvalue())
    rows = {r["run_name"]: r for r in ledger.read_ledger(cache_dir)[1].to_pylist()}
    assert rows["with-local"]["object_store_bytes"] == store0 + store1
    assert rows["with-local"]["local_cache_bytes"] == local0 + local1
    assert rows["old"]["object_store_bytes"] is None and rows["old"]["local_cache_bytes"] is None
    costs = cache_costs(cache_dir)
    assert (costs["object_store_bytes"], costs["network_runs"]) == (store0 + store1, 1)


def test_projected_object_store_bytes_with_the_local_cache() -> None:
    assert object_store_bytes_with_local_cache(118.6, 3.16, None) == 3.16  # each object once per node
    assert object_store_bytes_with_local_cache(0.4, 3.16, None) == 0.4  # a short run: byte ranges are cheaper
    half = object_store_bytes_with_local_cache(118.6, 3.16, 1.58)
    assert abs(half - (1.58 + 0.5 * 118.6)) < 1e-9
