"""The train stage's reader refuses a source image that changed after extraction, instead of pairing its new pixels
with the targets of the old ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.cache import open_cache
from stages.extract import ExtractJob, UnitExtractor, prepare
from stages.images import SourceChangedError
from stages.manifest import manifest_from_uri_list, write_manifest
from stages.train.data import SamplePlan, TrainBatches, make_loader
from stages.uri_policy import UriPolicy, UriPolicyError
from tests.fixtures.data import encode, sample_images
from tests.fixtures.extract import make_job

N = 8


@pytest.fixture
def extracted(tmp_path: Path, base_checkpoint: Path) -> tuple[list[Path], str, ExtractJob]:
    """N grey PNGs, their manifest (sizes and mtimes recorded) and a cache extracted from it in this process."""
    paths = []
    for i, img in enumerate(sample_images(N)):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(encode(Image.fromarray(img), "PNG"))
    (tmp_path / "list.csv").write_text("uri\n" + "\n".join(map(str, paths)) + "\n")
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(manifest_from_uri_list(str(tmp_path / "list.csv")), manifest)
    job = make_job(tmp_path / "cache", manifest, base_checkpoint, unit_size=N, batch_size=16)
    spec, _ = prepare(job)
    UnitExtractor(job, spec, device="cpu", threads=1).run_unit(0)
    return paths, manifest, job


def _batches(job: ExtractJob, manifest: str, online: bool, policy: UriPolicy | None = None) -> list[dict]:
    cache = open_cache(job.cache_url)
    plan = SamplePlan(cache.valid(), block_size=cache.block_size, views_per_image=2, seed=0,
                      global_batch=4, world_size=1)
    data = TrainBatches(plan, 0, 0, 0, manifest_url=manifest, preprocess=job.preprocess, in_chans=1,
                        cache_url=None if online else job.cache_url, view_seed=job.view_seed, uri_policy=policy)
    return list(make_loader(data, num_workers=0))


@pytest.mark.parametrize("online", [False, True], ids=["cached", "online"])
def test_a_source_changed_after_extraction_is_refused_naming_it(extracted, online: bool) -> None:
    paths, manifest, job = extracted
    first = _batches(job, manifest, online)
    assert len(first) == 2 and all(b["pixels"].shape == (4, 1, 32, 32) for b in first)
    victim = paths[int(first[1]["indices"][0])]
    replaced = np.asarray(Image.open(victim))[::-1].copy()  # other pixels, of course another PNG size
    victim.write_bytes(encode(Image.fromarray(replaced), "PNG", compress_level=0))
    with pytest.raises(SourceChangedError, match=rf"^{victim}: the source changed after the manifest was made "
                                                 r"\(manifest size \d+ bytes, found \d+ bytes\)") as info:
        _batches(job, manifest, online)
    assert info.value.uri == str(victim)


def test_the_reader_applies_the_configured_input_policy(extracted) -> None:
    """Training reads under the data section's policy (TrainJob.uri_policy), not under the defaults."""
    _, manifest, job = extracted
    with pytest.raises(UriPolicyError, match=r"data\.allowed_schemes"):
        _batches(job, manifest, online=True, policy=UriPolicy(allowed_schemes=("s3",)))
    assert len(_batches(job, manifest, online=True, policy=UriPolicy())) == 2
