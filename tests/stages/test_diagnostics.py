"""stages.extract.diagnostics: the base diagnostics on crafted targets, on a random tiny base, and in the cache."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.cache import DIAGNOSTICS_ATTR, open_cache, read_diagnostics_attr
from stages.extract import NonFiniteTargetsError, resolve_spec, run_extract
from stages.extract.diagnostics import (
    BaseDiagnostics,
    compute_diagnostics,
    diagnose_base,
    entropy_summary,
    topk_iou,
)
from tec_model import build_vit
from tests.fixtures.extract import base_kwargs, make_job

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


@pytest.mark.parametrize("bad, named", [("features", "features"), ("attn_logits", "attention logits")])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_targets_are_refused_naming_them(bad: str, named: str, value: float):
    gen = torch.Generator().manual_seed(0)
    n, v = 3, 2
    features, attn = torch.randn(n * v, L, C, generator=gen), torch.randn(n * v, K + 1, H, L, generator=gen)
    {"features": features, "attn_logits": attn}[bad][3, 0, 1] = value  # image 1 (rows image-major), view 1
    boxes = np.tile(np.array([0, 0, 8, 8, 0]), (n, v, 1))
    with pytest.raises(NonFiniteTargetsError, match=rf"base diagnostics: the base model base\.pth gave NaN/inf "
                       rf"targets \(float16; {named}\) for 1 of 3 sampled image\(s\), first \[12\]"):
        compute_diagnostics(features, attn, torch.arange(K).repeat(n * v, 1), boxes, np.full((n, 2), 8),
                            base="base.pth", images=[4, 12, 20])


def overflowing_checkpoint(path: Path, layer: str, factor: float) -> Path:
    """A tiny base with finite weights whose ``layer`` weights, scaled by ``factor``, overflow float16."""
    torch.manual_seed(11)
    sd = build_vit(base_kwargs()).state_dict()
    torch.save({"model": {k: v * factor if layer in k else v for k, v in sd.items()}}, path)
    return path


# fc2 of block 0 ×1e7: features reach ~8e5 (inf in float16), attention finite (the old code stored a None-filled
# summary, then failed formatting it); every qkv ×1e3: attention logits ~7e4 (inf), entropies NaN (the old code
# failed computing the summary's entropy fraction)
@pytest.mark.parametrize("layer, factor, named", [("blocks.0.mlp.fc2.", 1e7, "features"),
                                                  (".attn.qkv.", 1e3, "attention logits")])
def test_extract_refuses_a_non_finite_base_and_stores_no_diagnostics(layer: str, factor: float, named: str,
                                                                     fmnist_manifest, tmp_path):
    checkpoint = overflowing_checkpoint(tmp_path / "overflowing.pth", layer, factor)
    url = str(tmp_path / "cache")
    job = make_job(url, fmnist_manifest(16), checkpoint, diagnostic_images=4)
    pattern = (rf"base diagnostics: the base model {re.escape(str(checkpoint))} gave NaN/inf targets "
               rf"\(float16; {named}\) for [1-4] of 4 sampled image\(s\), first \[[0-3]")
    for _ in range(2):  # a rerun fails the same way, not on a stored summary
        with pytest.raises(NonFiniteTargetsError, match=pattern):
            run_extract(job, num_actors=0)
        assert read_diagnostics_attr(url) is None
    assert not (tmp_path / "cache" / "units").exists()


def test_a_stored_summary_with_missing_values_still_prints():
    """A summary stored before non-finite targets were refused holds None for NaN/inf values: shown as n/a."""
    stored = crafted(torch.full((4, K + 1, H, L), 2.5)).to_dict()
    stored.update(attn_entropy=[None, 1.0], attn_top_prob=[None, 0.1], channel_std=[None, None, 1.0],
                  token_abs_cos=None, topk_iou_chance=None)
    diag = BaseDiagnostics.from_dict(stored)
    lines = diag.summary_lines()
    assert "entropy n/a of log L" in lines[1] and "p10/p50/p90 n/a/n/a/1" in lines[-1] and "(raw n/a)" in lines[-1]
    assert "random patches: n/a" in lines[-2]
    assert diag.entropy_fraction[0] is None and diag.warnings() == []  # 1.0 / log 16 is far from uniform
    assert diag.to_dict()["entropy_fraction"][0] is None
