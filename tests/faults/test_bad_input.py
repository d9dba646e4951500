"""The bad-input corpus: every bad input ends in a named error (class and a message naming the file or field) or in a
recorded skip (a row of the cache's failures table with a reason), as docs/reliability.md lists.

Decode-level cases of single images are in tests/stages/test_images.py, override-level config errors in
tests/pipeline/test_config.py and format-level checkpoint errors in tests/tec_model/test_checkpoint.py; here the bad
inputs go through the entry points a run uses (extraction, config files, base-model loading, training steps).
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from stages.cache import TooManyBadImagesError, create_or_open
from stages.extract import NonFiniteTargetsError, UnitExtractor, prepare, run_extract
from stages.idx import IdxError, idx_uri
from stages.manifest import ManifestError, validate_manifest, write_manifest
from stages.train import NonFiniteLossError, TargetProvider, optimizer_step
from stages.train.job import TrainJob
from stages.uri_policy import DEFAULT_POLICY, UriPolicy, UriPolicyError
from tec_model import CheckpointError, build_vit, vit_kwargs
from tests.faults.s3_faults import record
from tests.fixtures.extract import EXTRACT_DEFAULTS, base_kwargs, make_job
from tests.fixtures.limits import address_space_cap, gzip_bomb
from tests.fixtures.models import make_base, make_tec

pytestmark = pytest.mark.faults


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG" if mode != "F" else "TIFF")
    return buf.getvalue()


def _good(seed: int) -> bytes:
    return _png(np.random.default_rng(seed).integers(0, 255, (40, 36), dtype=np.uint8))


# name: (how the file is made, the reason recorded in the failures table)
IMAGE_CORPUS: dict[str, tuple[Callable[[Path], str], str]] = {
    "truncated_png": (lambda d: _write(d / "t.png", _good(1)[:200]), "truncated"),
    "random_bytes": (lambda d: _write(d / "r.png", np.random.default_rng(2).bytes(500)), "not_an_image"),
    "empty_file": (lambda d: _write(d / "e.png", b""), "empty"),
    "corrupt_png_data": (lambda d: _write(d / "c.png", _corrupt_png()), "corrupt"),
    "float_tiff": (lambda d: _write(d / "f.tif", _png(np.ones((8, 8), np.float32), "F")), "unsupported_mode"),
    "one_pixel": (lambda d: _write(d / "p.png", _png(np.zeros((1, 1), np.uint8))), "too_small"),
    "missing_file": (lambda d: str(d / "does_not_exist.png"), "missing"),
    "directory_not_file": (lambda d: str((d / "a_dir.png").mkdir() or d / "a_dir.png"), "missing"),
    "unknown_scheme": (lambda d: "nosuchscheme://bucket/x.png", "missing"),
    "idx_record_out_of_range": (lambda d: "", "missing"),  # filled in by the test: needs the IDX file
}


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _corrupt_png() -> bytes:
    data = bytearray(_good(3))
    idat = data.index(b"IDAT")
    data[idat + 8: idat + 40] = bytes(32)  # zlib stream damaged, CRC left wrong
    return bytes(data)


def test_bad_images_in_a_manifest_are_recorded_skips(tmp_path: Path, base_checkpoint: Path, fmnist_dir: Path) -> None:
    """One unit of good and bad images: the good ones get targets, each bad one a failures row with its reason."""
    uris, expected = [], {}
    for i, (name, (make, reason)) in enumerate(IMAGE_CORPUS.items()):
        uri = make(tmp_path) if name != "idx_record_out_of_range" else \
            f"idx://{fmnist_dir / 'train-images-idx3-ubyte.gz'}#99999999"
        uris += [_write(tmp_path / f"good{i}.png", _good(10 + i)), uri]
        expected[2 * i + 1] = (name, reason)
    manifest = str(tmp_path / "manifest.parquet")
    table = pa.table({"index": np.arange(len(uris), dtype=np.int64), "uri": uris})
    write_manifest(validate_manifest(table), manifest)
    # Half the unit's images are bad on purpose: the failure-rate guard must allow that many.
    job = make_job(tmp_path / "cache", manifest, base_checkpoint, unit_size=len(uris), batch_size=8,
                   max_failed_fraction=0.5)
    spec, cache = prepare(job)
    UnitExtractor(job, spec, device="cpu", threads=1).run_unit(0)
    fails = cache.failures().to_pylist()
    assert {row["index"]: row["reason"] for row in fails} == {i: reason for i, (_, reason) in expected.items()}
    batch = cache.read_unit(0)
    assert batch.valid.tolist() == [i not in expected for i in range(len(uris))]
    assert np.abs(batch.features[~batch.valid].astype(np.float32)).sum() == 0
    assert np.isfinite(batch.features[batch.valid].astype(np.float32)).all()
    for row in fails:
        name = expected[row["index"]][0]
        assert row["uri"] == uris[row["index"]] and row["message"], name
        record("input", input=f"image: {name.replace('_', ' ')}",
               outcome=f"recorded skip, reason `{row['reason']}` (valid=False, failures table)")


def _manifest_of(tmp_path: Path, uris: list[str]) -> str:
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(validate_manifest(pa.table({"index": np.arange(len(uris), dtype=np.int64), "uri": uris})), manifest)
    return manifest


def test_a_unit_losing_too_many_images_stops_the_job(tmp_path: Path, base_checkpoint: Path, ray_cluster) -> None:
    """Unit 1's images are all gone (a data set that vanished looks like this): the job ends in
    TooManyBadImagesError naming the unit, the count and the fraction, and unit 1 is never marked complete."""
    uris = [_write(tmp_path / f"good{i}.png", _good(30 + i)) for i in range(4)]
    uris += [str(tmp_path / "gone" / f"{i}.png") for i in range(4)]
    job = make_job(tmp_path / "cache", _manifest_of(tmp_path, uris), base_checkpoint, unit_size=4, batch_size=8)
    expected = r"unit 1: 4 of 4 images failed \(100\.0%\), more than extract\.max_failed_fraction = 5\.0% allows"
    with pytest.raises(TooManyBadImagesError, match=expected + r" \(at most 1\)") as info:
        run_extract(job, num_actors=1)
    assert "Reasons: missing ×4" in str(info.value)
    cache = create_or_open(job.cache_url, prepare(job)[0])
    assert 1 not in cache.complete_units() and not (tmp_path / "cache" / "units" / "1.done").exists()
    failed, total = map(int, re.search(r"unit 1: (\d+) of (\d+) images failed", str(info.value)).groups())
    record("input", input="a unit whose images are all missing",
           outcome=f"`TooManyBadImagesError`, unit not written: {_first_line(_cause_text(info.value))[:80]}",
           images_failed=failed, images_in_unit=total, units_complete=len(cache.complete_units()),
           unit_marked_complete=int(1 in cache.complete_units()))


def _cause_text(exc: BaseException) -> str:
    """The message of the error a Ray task raised, without Ray's header (which names actor, pid and address)."""
    text = str(exc)
    return text[text.index("unit "):] if "ray::" in text else text


def _bomb(path: Path) -> str:
    """A 4 MB IDX .gz inflating to 4 GiB behind a header that declares ten 28×28 images; its first record's URI."""
    gzip_bomb(path, (10, 28, 28), 4 * 2**30)
    return idx_uri(path, 0)


HOSTILE: dict[str, tuple[Callable[[Path], str], type[Exception], str, UriPolicy]] = {
    # name: (the URI, the error extraction ends in, a fragment of its message, the job's policy)
    "idx_dev_zero": (lambda d: "idx:///dev/zero#0", IdxError, "not a regular file", DEFAULT_POLICY),
    "idx_gzip_bomb": (lambda d: _bomb(d / "b-images-idx3-ubyte.gz"), IdxError, "more than 7840 bytes",
                      DEFAULT_POLICY),
    "metadata_address": (lambda d: "http://169.254.169.254/latest/meta-data/iam/x.png", UriPolicyError,
                         "link-local or cloud-metadata address", UriPolicy(allowed_schemes=("file", "http"))),
    "scheme_not_allowed": (lambda d: "https://example.com/x.png", UriPolicyError, "scheme 'https' is not allowed",
                           DEFAULT_POLICY),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_uris_end_extraction_in_a_named_error_within_a_second(case: str, tmp_path: Path,
                                                                     base_checkpoint: Path) -> None:
    """Under an address-space cap, so a broken bound ends in MemoryError rather than in an exhausted machine."""
    make, error, fragment, policy = HOSTILE[case]
    uris = [_write(tmp_path / "good.png", _good(40)), make(tmp_path)]
    job = make_job(tmp_path / "cache", _manifest_of(tmp_path, uris), base_checkpoint, unit_size=2, batch_size=8,
                   uri_policy=policy)
    spec, cache = prepare(job)
    extractor = UnitExtractor(job, spec, device="cpu", threads=1)
    started = time.monotonic()
    with address_space_cap(), pytest.raises(error) as info:
        extractor.run_unit(0)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert fragment in str(info.value) and uris[1].split("#")[0].removeprefix("idx://") in str(info.value)
    assert cache.complete_units() == []
    record("input", input=f"image URI: {case.replace('_', ' ')}",
           outcome=f"`{error.__name__}`, unit not written: {_first_line(info.value)[:90]}",
           seconds_to_error=round(elapsed, 3))


def test_a_device_file_in_a_manifest_is_a_recorded_skip_never_read(tmp_path: Path, base_checkpoint: Path) -> None:
    uris = [_write(tmp_path / "good.png", _good(41)), "file:///dev/zero"]
    job = make_job(tmp_path / "cache", _manifest_of(tmp_path, uris), base_checkpoint, unit_size=2, batch_size=8,
                   max_failed_fraction=0.5)
    spec, cache = prepare(job)
    extractor = UnitExtractor(job, spec, device="cpu", threads=1)
    with address_space_cap():
        extractor.run_unit(0)
    (row,) = cache.failures().to_pylist()
    assert (row["index"], row["reason"], row["message"]) == (1, "missing", "not a regular file (a character device)")
    record("input", input="image URI: file:///dev/zero", outcome="recorded skip, reason `missing` (not a regular file)")


# -------------------------------------------------------------------------------------------------- manifests
MANIFESTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "not_parquet": (lambda p: p.write_bytes(b"index,uri\n0,a.png\n"), r"not a Parquet manifest"),
    "truncated_parquet": (lambda p: p.write_bytes(_parquet({"index": [0, 1], "uri": ["a", "b"]})[:-20]),
                          r"not a Parquet manifest"),
    "no_uri_column": (lambda p: p.write_bytes(_parquet({"index": [0], "path": ["a.png"]})), r"missing column 'uri'"),
    "index_not_0_to_n": (lambda p: p.write_bytes(_parquet({"index": [0, 2], "uri": ["a", "b"]})),
                         r"column 'index' must be 0\.\.1"),
    "uri_not_strings": (lambda p: p.write_bytes(_parquet({"index": [0], "uri": [[1, 2]]})), r"column 'uri' must hold"),
    "null_uri": (lambda p: p.write_bytes(_parquet({"index": [0, 1], "uri": ["a", None]})), r"'uri' has null"),
    "label_not_integer": (lambda p: p.write_bytes(_parquet({"index": [0], "uri": ["a"], "label": ["cat"]})),
                          r"column 'label' must hold int64"),
}


def _parquet(columns: dict) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_bad_manifests_stop_extraction_with_manifest_error(case: str, tmp_path: Path, base_checkpoint: Path) -> None:
    make, pattern = MANIFESTS[case]
    path = tmp_path / "manifest.parquet"
    make(path)
    with pytest.raises(ManifestError, match=rf"^{path}: .*{pattern}") as info:
        prepare(make_job(tmp_path / "cache", str(path), base_checkpoint))
    assert not (tmp_path / "cache").exists()  # nothing was created
    record("input", input=f"manifest: {case.replace('_', ' ')}", outcome=f"`ManifestError`: {_first_line(info.value)}")


def test_missing_manifest_is_a_file_not_found_naming_it(tmp_path: Path, base_checkpoint: Path) -> None:
    path = tmp_path / "absent.parquet"
    with pytest.raises(FileNotFoundError, match=r"absent\.parquet"):
        prepare(make_job(tmp_path / "cache", str(path), base_checkpoint))
    record("input", input="manifest: file missing", outcome="`FileNotFoundError` naming the path")


# ---------------------------------------------------------------------------------------------------- configs
CONFIGS: dict[str, tuple[str, str]] = {
    # name: (file content, a fragment every error message must contain)
    "unclosed_bracket": ("train:\n  epochs: [1, 2\n", "malformed YAML"),
    "tab_indentation": ("train:\n\tepochs: 2\n", "malformed YAML"),
    "bad_indentation": ("train:\n  epochs: 2\n   blr: 1e-3\n", "malformed YAML"),
    "python_object_tag": ("name: !!python/object/apply:os.system ['touch {marker}']\n", "malformed YAML"),
    "binary_garbage": ("\x00\x01\x02\xff", "not UTF-8 text"),
    "top_level_list": ("- train\n- epochs\n", "expected a mapping at the top level"),
    "epochs_is_a_string": ("train:\n  epochs: three\n", "train.epochs: expected int"),
    "epochs_is_a_list": ("train:\n  epochs: [1]\n", "train.epochs: expected int"),
    "blr_is_a_mapping": ("train:\n  blr: {a: 1}\n", "train.blr: expected float"),
    "mean_is_a_string": ("preprocess:\n  norm: custom\n  mean: grey\n  std: [0.3]\n", "preprocess.mean"),
    "section_is_a_scalar": ("model: 3\n", "model: expected a mapping"),
    "limit_is_a_bool_string": ("data:\n  limit: lots\n", "data.limit: expected int or null"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_files_raise_config_error(case: str, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    text, fragment = CONFIGS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(text.replace("{marker}", str(marker)).encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert fragment in message, message
    if "malformed" in fragment:
        assert str(path) in message  # names the file (and the line, when YAML knows it)
    assert not marker.exists()  # the YAML loader is safe: no tag ever runs code
    record("input", input=f"config: {case.replace('_', ' ')}", outcome=f"`ConfigError`: {_first_line(info.value)}")


def test_config_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    record("input", input="config: file missing", outcome="`ConfigError`: cannot read config file")


# ------------------------------------------------------------------------------------------------ checkpoints
class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: detectable if a loader ever runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _checkpoints(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    sd = build_vit(base_kwargs()).state_dict()
    deeper = build_vit({**base_kwargs(), "depth": base_kwargs()["depth"] + 1}).state_dict()
    wider = build_vit(vit_kwargs("vit_nano_patch4_32", in_chans=1)).state_dict()
    rgb = build_vit(vit_kwargs("vit_pico_patch4_32", in_chans=3)).state_dict()
    missing = {k: v for k, v in sd.items() if not k.startswith("blocks.0.mlp")}
    nan = {k: (v.clone().fill_(float("nan")) if k == "blocks.1.attn.proj.weight" else v) for k, v in sd.items()}
    inf = {k: (v.clone().fill_(float("inf")) if k == "norm.weight" else v) for k, v in sd.items()}
    good = _saved({"model": sd})
    return {
        "pickled_callable": (_saved({"model": sd, "hook": _Payload(tmp_path / "pwned")}), "refused to load"),
        "pickled_os_system": (_saved({"model": sd, "run": os.system}), "refused to load"),
        "wrong_architecture_deeper": (_saved({"model": deeper}), "weights the architecture lacks"),
        "wrong_architecture_wider": (_saved({"model": wider}), "shape mismatches"),
        "wrong_in_chans": (_saved({"model": rgb}), "shape mismatches: patch_embed.proj.weight"),
        "missing_keys": (_saved({"model": missing}), "missing encoder weights (4)"),
        "nan_weights": (_saved({"model": nan}), "NaN or inf (1): blocks.1.attn.proj.weight"),
        "inf_weights": (_saved({"model": inf}), "NaN or inf (1): norm.weight"),
        "truncated_file": (good[: len(good) // 2], "is not a readable torch checkpoint"),
        "not_a_checkpoint": (b"PK\x03\x04 nothing", "is not a readable torch checkpoint"),
        "no_state_dict": (_saved({"epoch": 3, "args": [1, 2]}), "no state dict found"),
    }


@pytest.mark.parametrize("case", ["pickled_callable", "pickled_os_system", "wrong_architecture_deeper",
                                  "wrong_architecture_wider", "wrong_in_chans", "missing_keys", "nan_weights",
                                  "inf_weights", "truncated_file", "not_a_checkpoint", "no_state_dict"])
def test_bad_base_checkpoints_stop_extraction_with_checkpoint_error(case: str, tmp_path: Path,
                                                                   fmnist_manifest: Callable[[int], str]) -> None:
    """Through the extraction actor's own loading path; a pickled callable is refused before it can run."""
    data, fragment = _checkpoints(tmp_path)[case]
    path = tmp_path / f"{case}.pth"
    path.write_bytes(data)
    job = make_job(tmp_path / "cache", fmnist_manifest(16), path)
    spec, cache = prepare(job)
    with pytest.raises(CheckpointError) as info:
        UnitExtractor(job, spec, device="cpu", threads=1)
    assert fragment in str(info.value), str(info.value)
    assert not (tmp_path / "pwned").exists()
    assert cache.complete_units() == []
    record("input", input=f"base checkpoint: {case.replace('_', ' ')}",
           outcome=f"`CheckpointError`: {_first_line(info.value)[:110]}")


# ----------------------------------------------------------------------------------------- non-finite targets
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_targets_in_a_cache_stop_training(value: float, tmp_path: Path, base_checkpoint: Path,
                                                     fmnist_manifest: Callable[[int], str]) -> None:
    """A cache holding a NaN/inf target (a broken base model, a bad copy): the first step that reads it stops the run
    with NonFiniteLossError and the model is not updated."""
    job = make_job(tmp_path / "cache", fmnist_manifest(16), base_checkpoint, unit_size=16)
    spec, _ = prepare(job)
    UnitExtractor(job, spec, device="cpu", threads=1).run_unit(0)
    good = create_or_open(job.cache_url, spec).read_unit(0)
    features = good.features.copy()
    features[3, 1, 5, 7] = value
    cache = create_or_open(job.cache_url, spec)
    cache.write_unit(0, features, good.attn_logits, good.topk_index, good.views, good.valid, overwrite=True)
    idx = np.arange(16)
    read = cache.read_samples(idx, views=np.ones(16, np.int64))
    assert not np.isfinite(read.features.astype(np.float32)).all()

    train_job = TrainJob(run_name="nonfinite", storage_path=str(tmp_path / "runs"), cache_url=job.cache_url,
                         timm_kwargs=vit_kwargs("vit_pico_patch4_32", in_chans=1), base_timm_kwargs=base_kwargs(),
                         preprocess={"output_size": 32}, k_max=EXTRACT_DEFAULTS["k_max"], topk=4, global_batch=16,
                         num_workers=1)
    model = make_tec(make_base("vit_pico_patch4_32", k_max=EXTRACT_DEFAULTS["k_max"], in_chans=1),
                     arch="vit_pico_patch4_32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"pixels": torch.rand(16, 1, 32, 32), "features": torch.from_numpy(read.features),
             "attn_logits": torch.from_numpy(read.attn_logits), "topk_index": torch.from_numpy(read.topk_index)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(NonFiniteLossError, match=r"run nonfinite: non-finite loss (nan|inf) at step 0") as info:
        optimizer_step(train_job, model, opt, torch.amp.GradScaler("cpu", enabled=False),
                       TargetProvider(train_job, torch.device("cpu")), batch, torch.device("cpu"), "float32", step=0,
                       rank=0, world=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    record("input", input=f"cache target holding {value}", outcome=f"`NonFiniteLossError` at the first step reading "
           f"it: {_first_line(info.value)[:70]}")


def test_a_base_model_overflowing_float16_is_refused_at_extraction(tmp_path: Path,
                                                                    fmnist_manifest: Callable[[int], str]) -> None:
    """Finite weights whose activations overflow float16 (> 65504): the unit is refused, nothing is written."""
    sd = build_vit(base_kwargs()).state_dict()
    sd = {k: v * 1e7 if k.startswith("blocks.0.mlp.fc2.") else v for k, v in sd.items()}
    checkpoint = tmp_path / "overflowing.pth"
    torch.save({"model": sd}, checkpoint)
    job = make_job(tmp_path / "cache", fmnist_manifest(16), checkpoint, unit_size=16)
    spec, _ = prepare(job)
    with pytest.raises(NonFiniteTargetsError, match=r"unit 0: the base model gave NaN/inf targets") as info:
        UnitExtractor(job, spec, device="cpu", threads=1).run_unit(0)
    cache = create_or_open(job.cache_url, spec)
    assert cache.complete_units() == [] and not (tmp_path / "cache" / "units").exists()
    record("input", input="base model overflowing float16", outcome=f"`NonFiniteTargetsError`, unit not written: "
           f"{_first_line(info.value)[:60]}")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0].replace("|", "/")
