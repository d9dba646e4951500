"""stages.train.data: the epoch order (coverage, determinism, views, resume) and batches from a real extracted cache."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stages.cache import create_or_open, inner_images, open_cache, raw_bytes_per_view
from stages.cache.spec import CacheMismatchError, CacheSpec
from stages.extract import run_extract
from stages.images import ImageSource
from stages.train.data import (
    SamplePlan,
    TrainBatches,
    _Reader,
    fetch_amplification,
    make_loader,
)
from stages.views import Preprocess
from tests.fixtures.extract import make_job

REPO = Path(__file__).resolve().parents[2]
INVALID = (3, 17, 30)  # marked invalid in the plans of the cached tests


def synthetic_valid(n: int, invalid: int, seed: int = 0) -> np.ndarray:
    valid = np.ones(n, bool)
    valid[np.random.default_rng(seed).choice(n, invalid, replace=False)] = False
    return valid


def served(plan: SamplePlan, epoch: int) -> list[np.ndarray]:
    return [plan.rank_batch(epoch, s, r)[0] for s in range(plan.steps_per_epoch()) for r in range(plan.world_size)]


def order_digest(plan: SamplePlan, epoch: int) -> str:
    return hashlib.sha256(plan.epoch_order(epoch).tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------ plan only
def test_two_ranks_cover_every_valid_sample_exactly_once_when_batches_divide():
    valid = synthetic_valid(103, 7)  # 96 valid = 6 global batches of 16
    plan = SamplePlan(valid, block_size=8, views_per_image=2, seed=3, global_batch=16, world_size=2,
                      shuffle_window=2)
    for epoch in range(3):
        got = np.concatenate(served(plan, epoch))
        assert got.size == 96 and len(set(got.tolist())) == 96
        assert np.array_equal(np.sort(got), np.flatnonzero(valid))
        assert all(b.size == 8 for b in served(plan, epoch))


def test_a_remainder_is_skipped_never_duplicated_and_invalid_never_served():
    valid = synthetic_valid(100, 13)  # 87 valid, global batch 16: 5 steps, 7 skipped
    plan = SamplePlan(valid, block_size=4, views_per_image=3, seed=1, global_batch=16, world_size=2)
    assert plan.steps_per_epoch() == 5
    skipped = set()
    for epoch in range(4):
        got = np.concatenate(served(plan, epoch))
        assert got.size == 80 and len(set(got.tolist())) == 80 and valid[got].all()
        rest = set(np.flatnonzero(valid).tolist()) - set(got.tolist())
        assert 0 < len(rest) < plan.global_batch
        skipped |= rest
    assert len(skipped) > 7  # a different remainder every epoch


def test_order_is_a_pure_function_of_seed_and_epoch_even_in_a_fresh_process():
    kwargs = {"block_size": 16, "views_per_image": 4, "seed": 123, "global_batch": 32, "world_size": 4}
    valid = synthetic_valid(500, 20)
    plan = SamplePlan(valid, **kwargs)
    code = ("import numpy as np, hashlib; from stages.train.data import SamplePlan; "
            f"v = np.zeros(500, bool); v[{np.flatnonzero(valid).tolist()}] = True; "
            f"p = SamplePlan(v, **{kwargs!r}); print(hashlib.sha256(p.epoch_order(5).tobytes()).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == order_digest(plan, 5) == order_digest(SamplePlan(valid.copy(), **kwargs), 5)
    digests = {order_digest(plan, e) for e in range(6)}
    assert len(digests) == 6  # different epochs, different orders
    assert order_digest(SamplePlan(valid, **{**kwargs, "seed": 124}), 5) != order_digest(plan, 5)


def test_views_cycle_through_all_v_over_v_epochs_and_are_constant_per_block():
    plan = SamplePlan(np.ones(200, bool), block_size=10, views_per_image=3, seed=9, global_batch=20, world_size=1)
    idx = np.arange(200)
    seen = np.stack([plan.views_for(e, idx) for e in range(6)])
    for i in range(200):
        assert sorted(seen[:3, i].tolist()) == [0, 1, 2] and np.array_equal(seen[:3, i], seen[3:, i])
    assert (seen.reshape(6, 20, 10) == seen.reshape(6, 20, 10)[:, :, :1]).all()
    assert len(set(seen[0, ::10].tolist())) == 3  # offsets differ between blocks
    _, views = plan.rank_batch(2, 4, 0)
    assert np.array_equal(views, plan.views_for(2, plan.rank_batch(2, 4, 0)[0]))


def test_blocks_stay_together_within_their_shuffle_window():
    plan = SamplePlan(np.ones(64, bool), block_size=4, views_per_image=1, seed=5, global_batch=16, world_size=1,
                      shuffle_window=2)
    order = plan.epoch_order(0)
    for w in range(8):  # each window of 8 samples holds exactly two whole blocks
        blocks = np.unique(order[w * 8 : (w + 1) * 8] // 4)
        assert blocks.size == 2 and np.array_equal(np.sort(order[w * 8 : (w + 1) * 8]),
                                                   np.concatenate([np.arange(b * 4, b * 4 + 4) for b in blocks]))
    assert not np.array_equal(order, np.sort(order))


def test_an_epochs_order_is_built_once_while_the_next_one_is_read_ahead(monkeypatch):
    """Over an epoch's last steps the local cache's read-ahead asks for the next epoch's batches between the
    current epoch's: both orders stay built (two at a time), each built once, and equal to a fresh plan's."""
    plan = SamplePlan(np.ones(64, bool), block_size=4, views_per_image=1, seed=5, global_batch=16, world_size=1)
    built, real = [], SamplePlan._build_order
    monkeypatch.setattr(SamplePlan, "_build_order", lambda self, epoch: built.append(epoch) or real(self, epoch))
    for epoch, step in [(0, 2), (1, 0), (0, 3), (1, 1), (1, 2), (2, 0), (1, 3), (2, 1)]:
        plan.rank_batch(epoch, step, 0)
    assert built == [0, 1, 2] and sorted(plan._orders) == [1, 2]
    fresh = SamplePlan(np.ones(64, bool), block_size=4, views_per_image=1, seed=5, global_batch=16, world_size=1)
    assert np.array_equal(plan.epoch_order(2), fresh.epoch_order(2))


def test_invalid_configurations_are_refused_clearly():
    valid = np.ones(30, bool)
    with pytest.raises(ValueError, match=r"n_valid = 30 .*global_batch = 32"):
        SamplePlan(valid, block_size=4, views_per_image=2, seed=0, global_batch=32, world_size=2)
    with pytest.raises(ValueError, match="not a multiple of world_size"):
        SamplePlan(valid, block_size=4, views_per_image=2, seed=0, global_batch=9, world_size=2)
    with pytest.raises(ValueError, match="bool"):
        SamplePlan(np.ones(30), block_size=4, views_per_image=2, seed=0, global_batch=8, world_size=2)
    plan = SamplePlan(valid, block_size=4, views_per_image=2, seed=0, global_batch=8, world_size=2)
    with pytest.raises(IndexError):
        plan.rank_batch(0, plan.steps_per_epoch(), 0)
    with pytest.raises(IndexError):
        plan.rank_batch(0, 0, 2)


def test_fetch_amplification_is_one_for_large_batches_and_world_size_for_small_ones():
    big = SamplePlan(np.ones(4096, bool), block_size=16, views_per_image=2, seed=0, global_batch=1024, world_size=2)
    small = SamplePlan(np.ones(4096, bool), block_size=16, views_per_image=2, seed=0, global_batch=32, world_size=2)
    assert fetch_amplification(big) == pytest.approx(1.0, abs=0.05)
    assert fetch_amplification(small) == pytest.approx(2.0, abs=0.05)


# ---------------------------------------------------------------------------------------------- real cache
@pytest.fixture(scope="module")
def cached(ray_cluster, fmnist_manifest, base_checkpoint, tmp_path_factory):
    """A 40-image cache (V=2, units of 16, 32×32 grey views) and the job that made it."""
    url = str(tmp_path_factory.mktemp("train_data") / "cache")
    job = make_job(url, fmnist_manifest(40), base_checkpoint)
    run_extract(job, num_actors=1)
    return url, job


def cached_plan(url: str, world_size: int = 2) -> SamplePlan:
    cache = open_cache(url)
    valid = cache.valid()
    assert valid.all()
    valid[list(INVALID)] = False  # the plan may serve a subset of the cache's valid samples
    return SamplePlan(valid, block_size=cache.block_size, views_per_image=2, seed=4, global_batch=8,
                      world_size=world_size, shuffle_window=1)


def batches(url: str, job, plan: SamplePlan, rank: int, start: int = 0, online: bool = False, epoch: int = 1):
    return TrainBatches(plan, epoch, rank, start, manifest_url=job.manifest_url, preprocess=job.preprocess,
                        in_chans=1, cache_url=None if online else url, view_seed=job.view_seed)


def assert_same(a: dict, b: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


TENSORS = ("indices", "views", "boxes", "pixels", "features", "attn_logits", "topk_index")


def test_block_size_is_the_feature_inner_chunk(cached):
    url, _ = cached
    cache = open_cache(url)
    spec = cache.spec
    assert cache.block_size == inner_images(spec.unit_size, spec.num_patches * spec.embed_dim * 2) == 16


def test_cached_batches_rebuild_pixels_from_stored_boxes_and_serve_read_samples_rows(cached):
    url, job = cached
    plan, cache, source = cached_plan(url), open_cache(url), ImageSource(in_chans=1)
    uris = pq.read_table(job.manifest_url).column("uri").to_pylist()
    fetched, seen = 0, []
    for rank in range(2):
        got = list(batches(url, job, plan, rank))
        assert [b["step"] for b in got] == list(range(plan.steps_per_epoch())) == [0, 1, 2, 3]
        for b in got:
            idx, views = plan.rank_batch(1, b["step"], rank)
            ref = cache.read_samples(idx, views=views)
            assert np.array_equal(b["indices"].numpy(), idx) and np.array_equal(b["views"].numpy(), views)
            assert np.array_equal(b["boxes"].numpy(), ref.views)
            assert np.array_equal(b["features"].numpy(), ref.features) and b["features"].dtype == torch.float16
            assert np.array_equal(b["attn_logits"].numpy(), ref.attn_logits)
            assert np.array_equal(b["topk_index"].numpy(), ref.topk_index) and b["topk_index"].dtype == torch.int64
            pixels = torch.stack([job.preprocess.build(source.read(uris[i]), box) for i, box in zip(idx, ref.views,
                                                                                                  strict=True)])
            assert b["pixels"].dtype == torch.float32 and torch.equal(b["pixels"], pixels)
            assert b["bytes_read"] == 4 * raw_bytes_per_view(cache.spec)
            fetched += b["bytes_fetched"]
            seen.extend(idx.tolist())
    assert not set(seen) & set(INVALID) and len(seen) == len(set(seen)) == 32
    assert fetched / raw_bytes_per_view(cache.spec) / 32 == pytest.approx(fetch_amplification(plan, epoch=1))


def test_resume_from_step_k_yields_exactly_the_rest_of_a_full_iteration(cached):
    url, job = cached
    plan = cached_plan(url)
    full = list(batches(url, job, plan, rank=1))
    resumed = list(batches(url, job, plan, rank=1, start=2))
    assert [b["step"] for b in resumed] == [2, 3]
    for a, b in zip(full[2:], resumed, strict=True):
        assert_same(a, b, ("step", "bytes_read", *TENSORS))
    assert list(batches(url, job, plan, rank=1, start=plan.steps_per_epoch())) == []


def test_online_batches_equal_cached_batches(cached):
    url, job = cached
    plan = cached_plan(url)
    online = list(batches(url, job, plan, rank=0, online=True))
    for a, b in zip(list(batches(url, job, plan, rank=0)), online, strict=True):
        assert_same(a, b, ("step", "indices", "views", "boxes", "pixels"))
        assert "features" not in b
    with pytest.raises(ValueError, match="view_seed"):
        TrainBatches(plan, 0, 0, 0, manifest_url=job.manifest_url, preprocess=job.preprocess, in_chans=1)


def test_a_cache_that_does_not_match_the_config_is_refused(cached):
    url, job = cached
    plan = cached_plan(url)
    with pytest.raises(CacheMismatchError, match=r"preprocess\.output_size: cache has 32, config asks 28"):
        TrainBatches(plan, 0, 0, 0, manifest_url=job.manifest_url, preprocess=Preprocess.fashion_mnist(28),
                     in_chans=1, cache_url=url)
    with pytest.raises(CacheMismatchError, match=r"views\.seed: cache has 7, config asks 8"):
        TrainBatches(plan, 0, 0, 0, manifest_url=job.manifest_url, preprocess=job.preprocess, in_chans=1,
                     cache_url=url, view_seed=8)


@pytest.mark.parametrize("workers", [1, 2])
def test_spawned_loader_workers_yield_the_in_process_batches_in_order(cached, workers):
    url, job = cached
    plan = cached_plan(url, world_size=1)
    ref = list(make_loader(batches(url, job, plan, rank=0), num_workers=0))
    got = list(make_loader(batches(url, job, plan, rank=0), num_workers=workers, prefetch=2))
    assert [b["step"] for b in got] == list(range(plan.steps_per_epoch()))
    for a, b in zip(ref, got, strict=True):
        assert_same(a, b, ("step", "bytes_read", *TENSORS))


def test_one_loader_across_epochs_yields_each_epochs_batches_from_the_resume_step(cached):
    """``until`` spans epochs in one set of workers: from a mid-epoch start, the batches equal the per-epoch
    loaders' (the rest of that epoch, then the whole next ones), each tagged with its epoch."""
    url, job = cached
    plan = cached_plan(url, world_size=1)
    per, start = plan.steps_per_epoch(), 1
    ref = [b for epoch, first in ((0, start), (1, 0), (2, 0))
           for b in make_loader(batches(url, job, plan, rank=0, start=first, epoch=epoch), num_workers=0)]
    spanning = TrainBatches(plan, 0, 0, start, manifest_url=job.manifest_url, preprocess=job.preprocess, in_chans=1,
                            cache_url=url, view_seed=job.view_seed, until=3 * per)
    assert len(spanning) == 3 * per - start
    got = list(make_loader(spanning, num_workers=2, prefetch=2))
    assert [(b["epoch"], b["step"]) for b in got] == [divmod(g, per) for g in range(start, 3 * per)]
    for a, b in zip(ref, got, strict=True):
        assert_same(a, b, ("epoch", "step", "bytes_read", *TENSORS))
    with pytest.raises(ValueError, match="until 0 is before the first step 1"):
        TrainBatches(plan, 0, 0, start, manifest_url=job.manifest_url, preprocess=job.preprocess, in_chans=1,
                     cache_url=url, view_seed=job.view_seed, until=0)


# ------------------------------------------------------------------------------- the reader's gather, no extraction
SYN_N, SYN_V, SYN_U = 40, 3, 4
TARGETS = ("features", "attn_logits", "topk_index", "views", "valid")


@pytest.fixture(scope="module")
def synthetic(fmnist_manifest, tmp_path_factory):
    """A 40-image cache written with ``write_unit`` (random targets, V=3, units and blocks of 4) and its manifest."""
    url, manifest = str(tmp_path_factory.mktemp("reader") / "cache"), fmnist_manifest(SYN_N)
    spec = CacheSpec(checkpoint="file:///base.pth", checkpoint_sha256="a" * 64,
                     timm_kwargs={"img_size": 8, "patch_size": 4, "embed_dim": 6, "depth": 1, "num_heads": 2,
                                  "in_chans": 1},
                     k_max=2, output_size=8, mean=(0.5,), std=(0.25,), view_seed=0, views_per_image=SYN_V,
                     manifest_uri=manifest, manifest_sha256="b" * 64, n_images=SYN_N, num_patches=4, embed_dim=6,
                     num_heads=2, unit_size=SYN_U)
    cache, rng = create_or_open(url, spec), np.random.default_rng(0)
    for u in range(cache.n_units):
        n = len(cache.unit_range(u))
        cache.write_unit(u, rng.standard_normal((n, SYN_V, 4, 6)), rng.standard_normal((n, SYN_V, 3, 2, 4)),
                         rng.integers(0, 4, (n, SYN_V, 2)), rng.integers(0, 28, (n, SYN_V, 5)), np.ones(n, bool))
    return url, manifest


@pytest.mark.parametrize(("global_batch", "world_size", "window", "expected"), [
    (5, 1, 3, {"fetched", "held", "mixed"}),  # batches straddle windows: held and fresh blocks in one batch
    (6, 2, 2, {"fetched", "mixed"}),  # two ranks: each fetches the blocks it touches
    (8, 1, 1, {"fetched", "mixed"}),  # the invalid rows leave blocks partly unserved: held rows meet fresh ones
])
def test_reader_targets_equal_read_samples_of_each_batch(synthetic, global_batch, world_size, window, expected):
    url, manifest = synthetic
    cache = open_cache(url)
    valid = cache.valid()
    valid[list(INVALID)] = False
    plan = SamplePlan(valid, block_size=cache.block_size, views_per_image=SYN_V, seed=2, global_batch=global_batch,
                      world_size=world_size, shuffle_window=window)
    assert plan.block_size == SYN_U
    for epoch in (0, 1):
        fetched, seen = 0, set()
        for rank in range(world_size):
            reader = _Reader(TrainBatches(plan, epoch, rank, 0, manifest_url=manifest, in_chans=1, cache_url=url,
                                          preprocess=Preprocess.fashion_mnist(8), checked_spec=cache.spec))
            for step in range(plan.steps_per_epoch()):
                idx, views = plan.rank_batch(epoch, step, rank)
                held = {b in reader.lru.held for b in np.unique(idx // SYN_U).tolist()}
                seen.add("mixed" if len(held) == 2 else "held" if True in held else "fetched")
                got, f = reader._targets(idx)
                ref = cache.read_samples(idx, views=views)
                for name in TARGETS:
                    want = getattr(ref, name)
                    assert got[name].dtype == want.dtype and np.array_equal(got[name], want), (name, epoch, step)
                fetched += f
        assert seen == expected
        per_view = raw_bytes_per_view(cache.spec)
        assert fetched / per_view / (plan.steps_per_epoch() * global_batch) == pytest.approx(
            fetch_amplification(plan, epoch))
