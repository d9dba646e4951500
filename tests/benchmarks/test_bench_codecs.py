"""benchmarks/bench_codecs.py --from-cache: the codecs measured on the targets of an existing lossless cache."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_codecs
from stages.cache import create_or_open
from tests.stages.test_cache import make_spec, unit_data


def _cache(url: str, codec: str = "float16") -> None:
    """A 2-unit cache whose odd unit's first image is invalid (``unit_data``)."""
    cache = create_or_open(url, make_spec(codec=codec))
    for unit in range(cache.n_units):
        data = unit_data(unit, len(cache.unit_range(unit)))
        cache.write_unit(unit, data["features"], data["attn_logits"], data["topk_index"], data["views"],
                         data["valid"])


def test_cached_targets_are_the_first_valid_images_of_the_cache(tmp_path: Path) -> None:
    _cache(str(tmp_path / "c"))
    spec, (features, attn, topk, views) = bench_codecs.cached_targets(str(tmp_path / "c"), images=10_000)
    units = [unit_data(u, n) for u, n in enumerate((4, 4, 2))]  # N = 10 images in units of U = 4
    want = np.concatenate([d["features"][d["valid"]] for d in units])
    assert spec.n_images == len(features) == len(attn) == len(topk) == len(views) == len(want)
    assert features.tobytes() == want.tobytes() and spec.codec == "float16"
    spec, (features, *_) = bench_codecs.cached_targets(str(tmp_path / "c"), images=3)
    assert spec.n_images == len(features) == 3


def test_measure_codec_on_cached_targets_reports_the_codec_error(tmp_path: Path) -> None:
    _cache(str(tmp_path / "c"))
    lossless, targets = bench_codecs.cached_targets(str(tmp_path / "c"), images=10_000)
    args = argparse.Namespace(workdir=tmp_path, unit_size=4, repeats=1)
    f16, int8 = (bench_codecs.measure_codec(c, args, lossless, targets) for c in ("float16", "int8"))
    assert f16["features"]["relative"] == 0 and f16["attention_kl"]["1.0"]["max"] == 0
    assert 0 < int8["features"]["relative"] < 0.02 and 0 < int8["attention_kl"]["1.0"]["max"] < 1e-3
    assert int8["stored_bytes_per_view_uncompressed"] < f16["stored_bytes_per_view_uncompressed"]


def test_a_quantised_cache_is_refused_as_the_reference(tmp_path: Path) -> None:
    _cache(str(tmp_path / "q"), codec="int8")
    with pytest.raises(SystemExit, match=r"--from-cache .*q: a float16 cache is needed \(it has codec 'int8'\)"):
        bench_codecs.cached_targets(str(tmp_path / "q"), images=4)
