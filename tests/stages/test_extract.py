"""Stage 1 (extract) end to end on real Ray, real Fashion-MNIST images and real Zarr stores."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from infra import storage
from stages.cache import ARRAYS, open_cache
from stages.cache.spec import CacheMismatchError, CacheSpec, diff_specs
from stages.extract import prepare, resolve_spec, run_extract
from stages.images import ImageSource
from stages.manifest import manifest_from_uri_list, write_manifest
from stages.uri_policy import UriPolicy
from tec_model import BaseModel
from tests.fixtures.extract import EXTRACT_DEFAULTS, base_kwargs, make_job

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("ray_cluster")


def read_arrays(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(storage.zarr_store(url, read_only=True), mode="r")
    return {name: group[name][...] for name in ARRAYS}


def assert_identical(a_url: str, b_url: str) -> None:
    a, b = read_arrays(a_url), read_arrays(b_url)
    for name in ARRAYS:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


@pytest.fixture(scope="module")
def extracted(fmnist_manifest, base_checkpoint, tmp_path_factory) -> tuple[str, object]:
    """A 40-image cache extracted with one actor (units of 16: the last unit is partial)."""
    url = str(tmp_path_factory.mktemp("extracted") / "cache")
    job = make_job(url, fmnist_manifest(40), base_checkpoint)
    result = run_extract(job, num_actors=1)
    return url, job, result


def test_cached_targets_equal_a_fresh_forward_on_the_rebuilt_view(extracted, base_checkpoint):
    url, job, result = extracted
    assert sorted(result.units_written) == [0, 1, 2] and result.views_written == 80
    cache = open_cache(url)
    base = BaseModel.from_checkpoint(base_checkpoint, base_kwargs(), k_max=EXTRACT_DEFAULTS["k_max"])
    source = ImageSource(in_chans=1)
    uris = pq.read_table(job.manifest_url).column("uri").to_pylist()
    rng = np.random.default_rng(0)
    picks = [(int(i), int(v)) for i, v in zip(rng.integers(0, 40, 12), rng.integers(0, 2, 12), strict=True)]
    batch = cache.read_samples(np.array([i for i, _ in picks]))
    for row, (i, v) in enumerate(picks):
        image = source.read(uris[i])
        box = batch.views[row, v]
        assert np.array_equal(box, job.preprocess.plan(job.view_seed, i, v, *image.shape[:2]))
        fresh = base(job.preprocess.build(image, box)[None])
        cached_f = torch.from_numpy(batch.features[row, v].astype(np.float32))
        cached_a = torch.from_numpy(batch.attn_logits[row, v].astype(np.float32))
        # fp16 rounding: relative error ≤ 2^-11, plus subnormal slack near zero
        torch.testing.assert_close(cached_f, fresh.features[0], rtol=2**-10, atol=1e-4)
        torch.testing.assert_close(cached_a, fresh.attn_logits[0], rtol=2**-10, atol=1e-4)
        assert np.array_equal(batch.topk_index[row, v], fresh.topk_index[0].numpy())


def test_one_and_two_actors_in_any_unit_order_give_identical_bytes(extracted, tmp_path):
    url, job, _ = extracted
    other = str(tmp_path / "cache")
    result = run_extract(make_job(other, job.manifest_url, job.checkpoint_url), num_actors=2, unit_order=[2, 0, 1])
    assert sorted(result.units_written) == [0, 1, 2]
    assert_identical(url, other)


def test_rerun_skips_complete_units_and_other_config_is_refused(extracted):
    url, job, _ = extracted
    again = run_extract(job, num_actors=1)
    assert again.units_written == [] and again.units_skipped == [0, 1, 2]
    with pytest.raises(CacheMismatchError, match=r"targets\.k_max: cache has 6, config asks 4"):
        prepare(make_job(url, job.manifest_url, job.checkpoint_url, k_max=4))
    with pytest.raises(CacheMismatchError, match=r"views\.seed"):
        prepare(make_job(url, job.manifest_url, job.checkpoint_url, view_seed=8))


def test_the_key_of_a_float16_job_resolves_before_the_workers_device_is_known(extracted, tmp_path):
    """The driver resolves a spec before its workers start (the precision is recorded, not in the key): a float16
    job gets the key of any other precision there, and is refused only once the workers turn out to be CPUs."""
    _, job, _ = extracted
    job = dataclasses.replace(job, cache_url=str(tmp_path / "cache16"), precision="float16")
    spec = resolve_spec(job)
    assert spec.precision == "float16" and spec.key == resolve_spec(dataclasses.replace(job, precision="auto")).key
    with pytest.raises(ValueError, match=r"extract\.precision float16 needs a CUDA device"):
        run_extract(job, num_actors=0)
    assert not storage.exists(job.cache_url), "a cache was created for workers that cannot write it"


def test_a_forced_checkpoint_entry_is_another_base_with_another_key(extracted):
    """Two entries of one checkpoint file (a DINO teacher and student) share the file's hash: the forced entry
    (base.checkpoint_key) keeps their caches apart; auto-detection keeps the key caches had before the field."""
    _, job, _ = extracted
    auto, student = resolve_spec(job), resolve_spec(dataclasses.replace(job, checkpoint_key="student"))
    assert student.checkpoint_key == "student" and student.checkpoint_sha256 == auto.checkpoint_sha256
    assert student.key != auto.key != resolve_spec(dataclasses.replace(job, checkpoint_key="teacher")).key
    assert "checkpoint_key" not in auto.to_attrs()["base_model"]
    assert student.to_attrs()["base_model"]["checkpoint_key"] == "student"
    assert CacheSpec.from_attrs(student.to_attrs()) == student
    assert diff_specs(auto, student) == ['base_model.checkpoint_key: cache has null, config asks "student"']


def test_the_image_limits_decide_the_valid_rows_and_so_the_key(extracted):
    """data.max_image_bytes / max_image_pixels decide which images are skipped as too large: a cache extracted
    under other limits holds other valid rows. At their defaults they leave the key what it was."""
    _, job, _ = extracted
    default = resolve_spec(job)
    tight = resolve_spec(dataclasses.replace(job, uri_policy=UriPolicy(max_image_pixels=100)))
    assert tight.max_image_pixels == 100 and tight.key != default.key
    assert "data" not in default.to_attrs() and tight.to_attrs()["data"] == {"max_image_pixels": 100}
    assert CacheSpec.from_attrs(tight.to_attrs()) == tight
    assert diff_specs(default, tight) == [
        f"data.max_image_pixels: cache has {default.max_image_pixels}, config asks 100"]


def test_a_resolved_spec_is_not_resolved_again(extracted, tmp_path, monkeypatch):
    """Given the spec, the driver reads neither manifest nor checkpoint: the worker reads each once (URIs, weights)
    and checks those bytes against the spec's hashes."""
    url, job, _ = extracted
    job = dataclasses.replace(job, cache_url=str(tmp_path / "cache"))
    spec = resolve_spec(job)
    reads: collections.Counter[str] = collections.Counter()
    real_read = storage.read_bytes

    def counting_read(target, *args, **kwargs):
        reads[os.path.basename(str(target))] += 1
        return real_read(target, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", counting_read)
    result = run_extract(job, num_actors=0, spec=spec)
    assert sorted(result.units_written) == [0, 1, 2] and result.cache_key == spec.key
    assert reads[os.path.basename(job.checkpoint_url)] == 1 and reads[os.path.basename(job.manifest_url)] == 1
    assert_identical(job.cache_url, url)
    with pytest.raises(ValueError, match="k_max"):  # a spec of another job is refused, naming the field
        run_extract(dataclasses.replace(job, k_max=job.k_max - 1), num_actors=0, spec=spec)


def test_a_checkpoint_or_manifest_changed_since_the_plan_is_refused_by_the_worker(extracted, tmp_path):
    """The driver keyed the cache by the bytes it hashed; a worker that loads other bytes (the file was overwritten
    meanwhile) would put another base's targets, or other images, under that key."""
    _, job, _ = extracted
    planned = resolve_spec(job)
    for field, actual, stale in (
            ("base_model.checkpoint_sha256", planned.checkpoint_sha256, planned.replace(checkpoint_sha256="0" * 64)),
            ("manifest.sha256", planned.manifest_sha256, planned.replace(manifest_sha256="1" * 64))):
        job = dataclasses.replace(job, cache_url=str(tmp_path / field))
        with pytest.raises(CacheMismatchError, match=rf"{re.escape(field)}: .* now hashes to {actual[:12]}"):
            run_extract(job, num_actors=0, spec=stale)
        assert not open_cache(job.cache_url).complete_units()


def test_whole_extraction_on_s3_read_back_with_plain_zarr(s3_url, extracted):
    import s3fs

    _, job, _ = extracted
    result = run_extract(make_job(s3_url, job.manifest_url, job.checkpoint_url), num_actors=1)
    assert sorted(result.units_written) == [0, 1, 2]
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], asynchronous=True)
    store = zarr.storage.FsspecStore(fs, path=s3_url.removeprefix("s3://"), read_only=True)
    group = zarr.open_group(store, mode="r")
    attrs = group.attrs["tec_cache"]
    assert attrs["format_version"] == 1 and attrs["targets"] == {"last_layers": 2, "k_max": 6, "precision": "float32"}
    assert attrs["views"] == {"seed": 7, "per_image": 2}
    assert group["features"].shape == (40, 2, 64, 48) and group["features"].dtype == np.float16
    assert group["attn_logits"].shape == (40, 2, 7, 3, 64)
    local = read_arrays(extracted[0])
    for name in ARRAYS:
        assert group[name][...].tobytes() == local[name].tobytes(), name


def test_bad_images_are_recorded_and_skipped(bad_images, image_folder, base_checkpoint, tmp_path):
    good = sorted(str(p) for p in image_folder.rglob("*.png"))[:3]
    bad = {key: str(path) for key, path in bad_images.items()}
    uris = [good[0], *bad.values(), good[1], good[2]]
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": uris}), listing)
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(manifest_from_uri_list(str(listing), stat=False), manifest)
    url = str(tmp_path / "cache")
    # Most images are bad on purpose: the failure-rate guard is off for this job.
    result = run_extract(make_job(url, manifest, base_checkpoint, unit_size=4, max_failed_fraction=1.0), num_actors=1)
    assert result.failures == len(bad)
    cache = open_cache(url)
    valid = read_arrays(url)["valid"]
    assert valid.tolist() == [True] + [False] * len(bad) + [True, True]
    failures = cache.failures().to_pylist()
    assert [f["index"] for f in failures] == list(range(1, 1 + len(bad)))
    assert [f["reason"] for f in failures] == [key.split("-")[0] for key in bad]
    markers = [json.loads(storage.read_bytes(f"{url}/units/{u}.done")) for u in range(cache.n_units)]
    assert sum(m["n_failures"] for m in markers) == len(bad)
