"""stages.cache.codecs: quantised target codecs, their error bounds, their cache format (v2) and their key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from infra import storage
from pipeline.config import load_config
from pipeline.config_load import ConfigError
from stages.cache import codecs, create_or_open, open_cache, raw_bytes_per_view
from stages.cache.spec import CacheFormatError, CacheMismatchError, CacheSpec, canonical_json, diff_specs
from stages.extract import ExtractJob, run_extract
from stages.images import ImageSource
from stages.train.job import CacheIncompatibleError, check_cache
from tec_model import BaseModel
from tests.fixtures.extract import EXTRACT_DEFAULTS, base_kwargs, make_job
from tests.fixtures.models import make_base
from tests.fixtures.train_runs import tiny_train_job
from tests.stages.test_cache import make_spec, unit_data

QUANTISED = ("int8", "fp8")
TAUS = (1.0, 1.4, 1.8)  # att_tau of the configs (iBOT, ViT-L MAE, ViT-B MAE / demo)
# Stated bounds (docs/cache-format.md#10-target-codecs): after patch norm, relative error of the features and the
# worst per-token cosine; the attention target's KL per row at any τ >= 1.
FEATURE_BOUNDS = {"int8": (0.02, 0.995), "fp8": (0.06, 0.99)}
ATTN_KL_MAX = 1e-3
# Computed with the code before codecs existed: a float16 cache keeps its key and its attribute, byte for byte.
FLOAT16_KEY = "53feba68b8e62cefa899a60064738e8b61fd71cbe2f6ab5bd08c5f5b64526e49"
FLOAT16_ATTRS_SHA256 = "1fae148137741d2309065b50348f685f3e7873df317fc6c607663843371685b8"


@pytest.fixture(scope="module")
def targets() -> tuple[np.ndarray, np.ndarray]:
    """A B-like random base's float16 targets of 8 images as one view each: (8, 1, 64, 96), (8, 1, 9, 6, 64)."""
    base = make_base(k_max=8)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = base(images)
    return out.features.half().numpy()[:, None], out.attn_logits.half().numpy()[:, None]


def _dequantised(codec: str, name: str, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    stored = codecs.encode(codec, name, x)
    return codecs.decode(codec, name, stored), stored


@pytest.mark.parametrize("codec", QUANTISED)
def test_round_trip_stays_within_the_stated_bounds(codec: str, targets) -> None:
    features, attn = targets
    got_f, stored_f = _dequantised(codec, "features", features)
    got_a, stored_a = _dequantised(codec, "attn_logits", attn)
    assert got_f.dtype == got_a.dtype == np.float16 and got_f.shape == features.shape and got_a.shape == attn.shape
    assert stored_f["features"].dtype == (np.int8 if codec == "int8" else np.uint8)
    assert stored_f["features_scale"].shape == features.shape[:-1]
    err = codecs.feature_error(features, got_f)
    rel_bound, cos_bound = FEATURE_BOUNDS[codec]
    assert err["relative"] < rel_bound and err["cosine_min"] > cos_bound, err
    for tau in TAUS:
        kl = codecs.attention_kl(attn, got_a, tau)
        assert kl["max"] < ATTN_KL_MAX, (tau, kl)
    # The offset keeps the dequantised logits near the logits themselves: within half a step (plus float16 rounding).
    step = stored_a["attn_logits_scale"].astype(np.float32)[..., None]
    gap = np.abs(got_a.astype(np.float32) - attn.astype(np.float32))
    assert (gap <= step / 2 + np.abs(attn.astype(np.float32)) * 2**-10 + 1e-6).all()


def test_codes_use_the_stored_scale_without_clipping() -> None:
    x = np.array([[[[3.0, -1.0, 0.5], [0.0, 0.0, 0.0], [0.25, -0.5, 0.0], [60000.0, 1.0, -1.0]]]], np.float16)
    q, scale = codecs.encode_int8_tokens(x)
    assert np.abs(q).max(-1).tolist() == [[[127, 0, 127, 127]]]  # full range used, never beyond
    assert (scale.astype(np.float32) * 127 >= np.abs(x.astype(np.float32)).max(-1)).all()  # rounded up
    assert (codecs.decode_int8_tokens(q, scale)[0, 0, 1] == 0).all()  # a zero token decodes to zeros
    tiny = np.array([1e-6, -2e-6, 0.0], np.float16)  # below float16's smallest scale: an absolute error <= 2^-25
    got = codecs.decode_int8_tokens(*codecs.encode_int8_tokens(tiny))
    assert np.abs(got.astype(np.float32) - tiny.astype(np.float32)).max() <= 2.0**-25
    bits, _ = codecs.encode_fp8_tokens(x)
    as_torch = torch.from_numpy(np.arange(256, dtype=np.uint8)).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(codecs.E4M3_VALUES, as_torch)  # NaN at 0x7F / 0xFF on both sides
    assert np.isfinite(codecs.E4M3_VALUES[bits]).all()


@pytest.mark.parametrize("codec", QUANTISED)
def test_values_at_the_float16_maximum_decode_finite_within_the_bounds(codec: str) -> None:
    """A token or attention row whose largest |value| is 65504 or 65472 gets a rounded-up scale with
    qmax · s > 65504 (int8: 127 · 516 = 65532; fp8: 448 · 146.25 = 65520): decoding must clamp, not give inf."""
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(8).astype(np.float32)
    rows = np.stack([
        np.r_[65504.0, -65504.0, 1.0, 0.5, -3.0, 0.0, 7.0, -0.25],
        np.r_[-65472.0, 65472.0, 2.0, -1.0, 0.0, 0.125, 5.0, -9.0],
        np.r_[65504.0, 65472.0, 60000.0, 1.0, -1.0, 0.0, 3.0, 2.0],  # one-signed: the offset is far from 0
        normal,
    ]).astype(np.float16)
    x = rows[None, None]  # (1, 1, 4, 8): features (n, V, L, C); attention rows (n, V, R=1, H=4, L=8) below
    a = rows[None, None, None]
    got_f, stored_f = _dequantised(codec, "features", x)
    got_a, stored_a = _dequantised(codec, "attn_logits", a)
    assert np.isfinite(got_f).all() and np.isfinite(got_a).all(), (got_f, got_a)
    ref_f, ref_a = x.astype(np.float32), a.astype(np.float32)
    scale = stored_f["features_scale"].astype(np.float32)[..., None]
    # features: int8 half a step; fp8 e4m3's relative half ulp (2^-4) or half its smallest subnormal step (2^-10 · s)
    tolerance = scale / 2 if codec == "int8" else np.maximum(np.abs(ref_f) * 2**-4, scale * 2**-10)
    assert (np.abs(got_f.astype(np.float32) - ref_f) <= tolerance + np.abs(ref_f) * 2**-11 + 1e-6).all()
    step = stored_a["attn_logits_scale"].astype(np.float32)[..., None]
    assert (np.abs(got_a.astype(np.float32) - ref_a) <= step / 2 + np.abs(ref_a) * 2**-10 + 1e-6).all()
    # 65504 itself comes back exactly (its code decodes beyond the maximum and is clamped onto it)
    assert got_f[0, 0, 0, 0] == got_a[0, 0, 0, 0, 0] == 65504 and got_f[0, 0, 0, 1] == got_a[0, 0, 0, 0, 1] == -65504
    # the normal token / row beside them decodes as it does alone
    np.testing.assert_array_equal(got_f[0, 0, 3], _dequantised(codec, "features", rows[3:])[0][0])
    np.testing.assert_array_equal(got_a[0, 0, 0, 3], _dequantised(codec, "attn_logits", rows[3:])[0][0])


def test_float16_keeps_its_key_its_attribute_and_its_bytes() -> None:
    spec = make_spec()
    assert spec.codec == "float16" and spec.format_version == 1 and spec.key == FLOAT16_KEY
    attrs = spec.to_attrs()
    assert hashlib.sha256(canonical_json(attrs).encode()).hexdigest() == FLOAT16_ATTRS_SHA256
    assert "codec" not in attrs["targets"] and CacheSpec.from_attrs(attrs) == spec
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 8)).astype(np.float16)
    assert codecs.decode("float16", "features", codecs.encode("float16", "features", x)).tobytes() == x.tobytes()


def test_the_codec_changes_the_key_and_is_named_in_diffs() -> None:
    keys = {codec: make_spec(codec=codec).key for codec in codecs.CODECS}
    assert len(set(keys.values())) == len(codecs.CODECS)
    q = make_spec(codec="int8")
    attrs = q.to_attrs()
    assert attrs["format_version"] == 2 and attrs["targets"]["codec"] == "int8" and CacheSpec.from_attrs(attrs) == q
    assert diff_specs(make_spec(), q) == ['targets.codec: cache has "float16", config asks "int8"']
    with pytest.raises(CacheFormatError, match="format_version"):
        CacheSpec.from_attrs({**attrs, "format_version": 1})
    with pytest.raises(ValueError, match="codec must be one of"):
        make_spec(codec="int4")


def test_stored_bytes_per_view_matches_the_stored_arrays() -> None:
    spec = make_spec()
    shape = (spec.num_patches, spec.embed_dim, spec.num_heads, spec.k_max)
    assert codecs.stored_bytes_per_view("float16", *shape) == raw_bytes_per_view(spec)
    rng = np.random.default_rng(0)
    arrays = {"features": rng.standard_normal((1, 1, spec.num_patches, spec.embed_dim)),
              "attn_logits": rng.standard_normal((1, 1, spec.k_max + 1, spec.num_heads, spec.num_patches))}
    for codec in QUANTISED:
        stored = codecs.encode_all(codec, arrays)
        assert codecs.stored_bytes_per_view(codec, *shape) == sum(a.nbytes for a in stored.values()) + \
            spec.k_max * 2 + 5 * 4
    vitb = (196, 768, 12, 15)
    assert codecs.stored_bytes_per_view("int8", *vitb) < 0.55 * codecs.stored_bytes_per_view("float16", *vitb)


@pytest.mark.parametrize("codec", QUANTISED)
def test_a_quantised_cache_is_format_2_and_reads_back_float16(codec: str, tmp_path: Path) -> None:
    url = str(tmp_path / codec)
    cache = create_or_open(url, make_spec(codec=codec))
    data = {u: unit_data(u, len(cache.unit_range(u))) for u in range(cache.n_units)}
    markers = [cache.write_unit(u, **d) for u, d in data.items()]
    group = zarr.open_group(storage.zarr_store(url, read_only=True), mode="r")
    assert group.attrs["tec_cache"]["format_version"] == 2 and {m["format_version"] for m in markers} == {2}
    assert group["features"].dtype == (np.int8 if codec == "int8" else np.uint8)
    assert group["features_scale"].chunks[0] == group["features"].chunks[0]
    stored = np.asarray(group["attn_logits_offset"][0:4])
    assert markers[0]["sha256"]["attn_logits_offset"] == hashlib.sha256(stored.tobytes()).hexdigest()
    assert set(markers[0]["sha256"]) == set(group.array_keys())
    reader = open_cache(url)
    unit = reader.read_unit(1)
    picked = reader.read_samples(np.array([9, 0, 5]), views=np.array([1, 0, 1]))
    assert unit.features.dtype == picked.attn_logits.dtype == np.float16
    want = data[1]["features"].astype(np.float32)
    tolerance = 1 / 254 if codec == "int8" else 1 / 16  # half a step of the token's absmax; e4m3: half an ulp
    assert np.abs(unit.features.astype(np.float32) - want).max() <= tolerance * np.abs(want).max()
    np.testing.assert_array_equal(picked.attn_logits[1], reader.read_unit(0).attn_logits[0, 0])
    np.testing.assert_array_equal(unit.topk_index, data[1]["topk_index"])
    summary = reader.summary()
    assert summary.units_complete == 3 and 0 < summary.stored_bytes < summary.raw_bytes
    with pytest.raises(CacheMismatchError, match=r"targets\.codec"):
        create_or_open(url, make_spec())
    v1 = create_or_open(str(tmp_path / "v1"), make_spec())
    v1.write_unit(0, **data[0])
    assert open_cache(v1.url).read_unit(0).features.tobytes() == data[0]["features"].tobytes()


def test_extract_codec_is_validated_naming_the_field() -> None:
    assert load_config(None).extract.codec == "float16"
    assert load_config(None, ["extract.codec=fp8"]).extract.codec == "fp8"
    with pytest.raises(ConfigError, match=r"extract\.codec: expected one of 'float16', 'int8', 'fp8', got 'int4'"):
        load_config(None, ["extract.codec=int4"])


@pytest.fixture(scope="module")
def int8_cache(fmnist_manifest, base_checkpoint, tmp_path_factory) -> tuple[str, ExtractJob]:
    """An in-process int8 extraction of 8 Fashion-MNIST images (V = 2, one unit) and its job."""
    job = make_job(str(tmp_path_factory.mktemp("int8") / "cache"), fmnist_manifest(8), base_checkpoint,
                   codec="int8", unit_size=8)
    run_extract(job, num_actors=0)
    return job.cache_url, job


def test_int8_cache_matches_a_fresh_forward_within_its_bound(int8_cache, base_checkpoint) -> None:
    url, job = int8_cache
    cache = open_cache(url)
    assert cache.spec.codec == "int8" and cache.spec.format_version == 2
    base = BaseModel.from_checkpoint(base_checkpoint, base_kwargs(), k_max=EXTRACT_DEFAULTS["k_max"])
    source, uris = ImageSource(in_chans=1), pq.read_table(job.manifest_url).column("uri").to_pylist()
    batch = cache.read_unit(0)
    fresh_f, fresh_a = [], []
    for i in range(8):
        image = source.read(uris[i])
        views = torch.stack([job.preprocess.build(image, batch.views[i, v]) for v in range(2)])
        with torch.no_grad():
            out = base(views)
        fresh_f.append(out.features.half().numpy())
        fresh_a.append(out.attn_logits.half().numpy())
    fresh_f, fresh_a = np.stack(fresh_f), np.stack(fresh_a)
    err = codecs.feature_error(fresh_f, batch.features)
    assert err["relative"] < FEATURE_BOUNDS["int8"][0] and err["cosine_min"] > FEATURE_BOUNDS["int8"][1], err
    for tau in TAUS:
        assert codecs.attention_kl(fresh_a, batch.attn_logits, tau)["max"] < ATTN_KL_MAX
    with pytest.raises(CacheIncompatibleError, match=r'targets\.codec: cache has "int8", config asks "float16"'):
        check_cache(tiny_train_job(url, "/unused", "codec-check"))
    assert check_cache(tiny_train_job(url, "/unused", "codec-check", codec="int8")).codec == "int8"


def test_marker_json_of_a_quantised_unit_names_every_stored_array(int8_cache) -> None:
    marker = json.loads(storage.read_bytes(storage.join(int8_cache[0], "units", "0.done")))
    assert set(marker["sha256"]) == {"features", "features_scale", "attn_logits", "attn_logits_scale",
                                     "attn_logits_offset", "topk_index", "views", "valid"}
    assert set(marker["stored_bytes"]) >= {"features_scale/c/0/0/0", "attn_logits_offset/c/0/0/0/0"}
