"""stages.extract.diagnostics: the base diagnostics on crafted targets, on a random tiny base, and in the cache."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from stages.cache import DIAGNOSTICS_ATTR, open_cache, read_diagnostics_attr
from stages.extract import resolve_spec, run_extract
from stages.extract.diagnostics import (
    BaseDiagnostics,
    compute_diagnostics,
    diagnose_base,
    entropy_summary,
    topk_iou,
)
from tests.fixtures.extract import make_job

L, H, K, C = 16, 2, 3, 8  # 4×4 patch grid


def crafted(attn_logits: torch.Tensor, n: int = 2, v: int = 2) -> BaseDiagnostics:
    """Diagnostics of n images × v identical full-image views with the given logits (n·v, K+1, H, L)."""
    gen = torch.Generator().manual_seed(0)
    boxes = np.tile(np.array([0, 0, 8, 8, 0]), (n, v, 1))
    topk = torch.arange(K).repeat(n * v, 1)
    return compute_diagnostics(torch.randn(n * v, L, C, generator=gen), attn_logits, topk, boxes,
                               np.full((n, 2), 8), taus=(1.0, 1.8))


def test_uniform_logits_have_entropy_fraction_one_and_warn_with_the_numbers():
    assert entropy_summary(torch.zeros(3, K + 1, H, L), tau=1.8)["entropy"] == pytest.approx(math.log(L))
    diag = crafted(torch.full((4, K + 1, H, L), 2.5))
    assert diag.entropy_fraction == pytest.approx([1.0, 1.0])
    [warning] = diag.warnings()
    assert "teach little" in warning and f"{math.log(L):.4f} nats" in warning and "τ=1.8" in warning


def test_peaked_attention_does_not_warn():
    logits = torch.zeros(4, K + 1, H, L)
    logits[..., 5] = 12.0  # one key dominates every row
    diag = crafted(logits)
    assert max(diag.entropy_fraction) < 0.2 and diag.warnings() == []
    assert diag.attn_top_prob[0] > 0.9
    # a margin wide enough to call this near-uniform warns: the margin is the knob
    assert diag.warnings(margin=0.99) != []


def test_topk_stability_maps_patches_through_the_crop_and_flip():
    sizes = np.array([[8, 8]])
    full, flipped = [0, 0, 8, 8, 0], [0, 0, 8, 8, 1]
    quadrant = [0, 4, 4, 4, 0]  # the source's top-right 4×4, seen by the whole 2×2 grid of the second view
    assert topk_iou(np.array([[[1], [1]]]), np.array([[full, full]]), sizes, grid=2) == 1.0  # identical views
    # the first view's patch 1 (top right) is the flipped view's patch 0
    assert topk_iou(np.array([[[1], [0]]]), np.array([[full, flipped]]), sizes, grid=2) == 1.0
    assert topk_iou(np.array([[[1], [1]]]), np.array([[full, flipped]]), sizes, grid=2) == 0.0
    # inside the common region (the quadrant) patch 1 of the full view covers all 16 pixels, the quadrant view's
    # patch 0 its top-left 2×2 = 4 of them; the full view's patch 0 lies outside the quadrant and is not counted
    assert topk_iou(np.array([[[0, 1], [0, 0]]]), np.array([[full, quadrant]]), sizes, grid=2) == 0.25
    bottom = [4, 0, 4, 4, 0]  # the bottom-left quadrant: the full view's patch 2, of which its patch 3 is a quarter
    assert topk_iou(np.array([[[2], [3]]]), np.array([[full, bottom]]), sizes, grid=2) == 0.25
    assert topk_iou(np.array([[[1]]]), np.array([[full]]), sizes, grid=2) is None  # one view: nothing to compare


def test_random_tiny_base_warns_with_its_numbers(fmnist_manifest, base_checkpoint, tmp_path):
    job = make_job(str(tmp_path / "unused"), fmnist_manifest(40), base_checkpoint)
    diag = diagnose_base(job, n_images=8, seed=3)
    assert (diag.n_images, diag.views_per_image, diag.num_patches, diag.topk) == (8, 2, 64, job.k_max)
    assert min(diag.entropy_fraction) > 0.99
    [warning] = diag.warnings()
    assert "teach little" in warning and f"{diag.attn_entropy[-1]:.4f} of {math.log(64):.4f} nats" in warning
    assert 0.0 <= diag.topk_iou_chance < diag.topk_iou <= 1.0 and 0.0 <= diag.dead_channel_fraction <= 1.0
    assert len(diag.summary_lines()) == 6 and not (tmp_path / "unused").exists()  # the cache is not touched
    assert BaseDiagnostics.from_dict(json.loads(json.dumps(diag.to_dict()))).to_dict() == diag.to_dict()


def test_extract_stores_the_summary_in_the_cache_attributes(fmnist_manifest, base_checkpoint, tmp_path, caplog):
    url = str(tmp_path / "cache")
    job = make_job(url, fmnist_manifest(16), base_checkpoint, diagnostic_images=6)
    with caplog.at_level(logging.INFO, logger="stages.extract.driver"):
        result = run_extract(job, num_actors=0)
    stored = read_diagnostics_attr(url)
    assert stored == diagnose_base(job, n_images=6).to_dict() and stored["n_images"] == 6
    assert result.cache_key == resolve_spec(job).key == open_cache(url).spec.key  # not in the key
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("teach little" in w for w in warnings)
    assert any("attention target at τ=1.8" in r.getMessage() for r in caplog.records)
    # a job that skips the diagnostics writes no attribute
    bare = str(tmp_path / "bare")
    run_extract(make_job(bare, fmnist_manifest(16), base_checkpoint, diagnostic_images=0), num_actors=0)
    assert read_diagnostics_attr(bare) is None
    assert DIAGNOSTICS_ATTR not in json.loads((tmp_path / "bare" / "zarr.json").read_text())["attributes"]
