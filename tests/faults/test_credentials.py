"""S3 credentials come only from the environment (or botocore's usual files) and never leave it; secrets inside URLs
(userinfo, presigned signatures and tokens) are stripped from everything stored, printed or logged.

Distinctive fake keys are put in the environment; everything a run writes is then searched for both values: every
object in the bucket, every local file of the run, the captured log records, the messages of failing S3 calls, and
(full suite) the Ray session's logs and the CLI's output of a whole ``run_pipeline.py run`` on S3. Distinctive
secrets are also planted in the URL fields of a config (the checkpoint and data files get presigned-style names, so
the run still reads them); every file the tiny run writes, what it prints and logs are searched for them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import run_pipeline
from infra import storage
from infra.logs import QUIET_LOGGERS
from infra.ray_cluster import _FORWARDED_ENV
from pipeline import ledger
from pipeline.config import base_timm_kwargs, load_config
from pipeline.orchestrate import locate_cache
from stages.cache import create_or_open, open_cache
from stages.cache.spec import CacheSpec
from stages.extract import UnitExtractor, prepare
from tec_model import build_vit
from tests.faults.s3_faults import FaultyS3, MotoServer, faulty_s3, record  # noqa: F401 - faulty_s3 is a fixture
from tests.fixtures.extract import make_job

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def fake_keys() -> tuple[str, str]:
    """An AKIA-style key id and a 40-character secret, random per test so nothing else can contain them."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    key_id = "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))
    return key_id, secrets.token_urlsafe(30)[:40]


def leaks(blob: bytes | str, values: tuple[str, ...]) -> list[str]:
    """Which of ``values`` occur in ``blob`` (the fake keys are URL-safe, so this also covers URL-encoded text)."""
    data = blob.encode() if isinstance(blob, str) else blob
    return [v for v in values if v.encode() in data]


def scan_tree(root: Path, values: tuple[str, ...]) -> tuple[int, dict[str, list[str]]]:
    """(files scanned, {file: leaked values}) for every regular file under ``root``."""
    found, n = {}, 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            n += 1
            try:
                hit = leaks(path.read_bytes(), values)
            except OSError:
                continue
            if hit:
                found[str(path)] = hit
    return n, found


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    key_id, secret = fake_keys()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage.clear_filesystem_cache()
    return key_id, secret


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record at DEBUG, third-party loggers at WARNING as the CLI's setup_logging keeps them."""
    saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    caplog.set_level(logging.DEBUG)
    yield caplog
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.faults
def test_keys_never_reach_storage_options_or_ray_env(keys: tuple[str, str], faulty_s3: FaultyS3) -> None:  # noqa: F811
    opts = storage.storage_options("s3")
    assert not leaks(repr(opts), keys)
    assert not leaks(repr(storage.zarr_store(faulty_s3.url).fs.storage_options), keys)
    assert not [name for name in _FORWARDED_ENV if "KEY" in name or "SECRET" in name or "TOKEN" in name]
    assert storage.read_bytes  # the helpers take URLs only; no credential argument exists anywhere in the module
    assert not {"key", "secret", "token"} & set(opts)
    record("input", input="credentials: storage options and Ray runtime env",
           outcome="keys absent (botocore resolves them from the environment/files)")


@pytest.mark.faults
def test_no_key_in_anything_an_s3_extraction_writes_or_logs(keys: tuple[str, str], faulty_s3: FaultyS3,  # noqa: F811
                                                             all_logs: pytest.LogCaptureFixture, tmp_path: Path,
                                                             fmnist_manifest: Callable[[int], str],
                                                             base_checkpoint: Path) -> None:
    """Extraction to S3 with faults (so retry warnings are logged) and failing calls: grep all of it."""
    faulty_s3.proxy.add("status", "PUT", path=r"/features/", count=3, status=503)
    faulty_s3.proxy.add("drop", "GET", count=1)
    job = make_job(faulty_s3.url, fmnist_manifest(16), base_checkpoint, unit_size=16, batch_size=16)
    spec, _ = prepare(job)
    UnitExtractor(job, spec, device="cpu", threads=1).run_unit(0)
    assert open_cache(faulty_s3.url).complete_units() == [0]

    messages = []
    faulty_s3.proxy.add("status", "PUT", count=None, status=403)  # echoes AWSAccessKeyId in the body, like AWS
    for call in (lambda: storage.write_bytes(storage.join(faulty_s3.url, "x"), b"1"),
                 lambda: storage.read_bytes("s3://no-such-bucket-tec/x"),
                 lambda: storage.write_bytes(storage.join(faulty_s3.url, "y"), b"2", storage.RetryPolicy(1))):
        with pytest.raises(Exception) as info:
            call()
        chain, exc = [], info.value
        while exc is not None:
            chain.append(f"{type(exc).__name__}: {exc!r} {exc}")
            exc = exc.__cause__ or exc.__context__
        messages.append("\n".join(chain))
        messages.append(str(info.getrepr(style="long")))  # the whole traceback, locals included
    faulty_s3.proxy.clear()

    objects = faulty_s3.objects()
    n_local, local = scan_tree(tmp_path, keys)
    assert {k: leaks(v, keys) for k, v in objects.items() if leaks(v, keys)} == {}
    assert local == {}
    assert leaks(all_logs.text, keys) == []
    assert "retry" in all_logs.text  # the faults were logged: the check covers retry warnings too
    assert leaks("\n".join(messages), keys) == []
    assert leaks(repr(open_cache(faulty_s3.url).spec.to_attrs()), keys) == []
    record("input", input=f"credentials: extraction on S3 ({len(objects)} objects, {len(all_logs.records)} log "
           f"records, {len(messages)} failure reports, {n_local} local files)", outcome="neither key found")


@pytest.mark.faults_full
def test_no_key_anywhere_after_a_whole_pipeline_run_on_s3(tmp_path: Path) -> None:
    """``run_pipeline.py run --config configs/tiny.yaml`` with output_root on S3 (moto), in a subprocess with the
    fake keys in its environment and its own Ray cluster; grep stdout/stderr, every bucket object and every file of
    the Ray session (driver, worker and Ray Train logs)."""
    moto = MotoServer()
    key_id, secret = fake_keys()
    bucket = "tec-creds-run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="tecray", dir="/tmp"))  # short: Ray's socket paths must stay < 108
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TEC_", "RAY_"))}
        env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
                   AWS_ENDPOINT_URL=moto.endpoint, TEC_S3_ENDPOINT_URL=moto.endpoint, RAY_TMPDIR=str(ray_tmp),
                   TEC_LOG_LEVEL="DEBUG", PYTHONPATH=str(REPO))
        import boto3

        boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                     aws_secret_access_key=secret).create_bucket(Bucket=bucket)
        cmd = [sys.executable, str(REPO / "run_pipeline.py"), "run", "--config", str(REPO / "configs/tiny.yaml"),
               f"output_root=s3://{bucket}/out", "data.limit=64", "train.epochs=1", "extract.unit_size=32",
               "extract.batch_size=32", "train.global_batch=32"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=900, check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output.decode(errors="replace")[-4000:]
        client = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                              aws_secret_access_key=secret)
        keys_found = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                      for o in page.get("Contents", [])]
        assert any(k.endswith(".done") for k in keys_found) and any("/runs/" in k for k in keys_found)
        bucket_leaks = {k: leaks(client.get_object(Bucket=bucket, Key=k)["Body"].read(), (key_id, secret))
                        for k in keys_found}
        n_ray, ray_leaks = scan_tree(ray_tmp, (key_id, secret))
        n_local, local_leaks = scan_tree(tmp_path, (key_id, secret))
        assert leaks(output, (key_id, secret)) == []
        assert {k: v for k, v in bucket_leaks.items() if v} == {}
        assert n_ray > 0 and ray_leaks == {}
        assert local_leaks == {}
        record("input", input=f"credentials: whole tiny run on S3 ({len(keys_found)} objects, {n_ray} Ray session "
               f"files, {n_local} local files, {len(output)} bytes of CLI output at DEBUG)",
               outcome="neither key found")
    finally:
        moto.stop()
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def url_secrets(*names: str) -> dict[str, str]:
    """One distinctive random secret per name (``{"sig": "sig-3f9a…"}``)."""
    return {name: f"{name}-{secrets.token_hex(8)}" for name in names}


def tiny_spec(checkpoint: str, manifest_uri: str) -> CacheSpec:
    """A small cache spec with the given location fields."""
    return CacheSpec(checkpoint=checkpoint, checkpoint_sha256="a" * 64, timm_kwargs={"img_size": 16, "patch_size": 4},
                     k_max=2, output_size=16, mean=(0.5,), std=(0.25,), view_seed=0, views_per_image=1,
                     manifest_uri=manifest_uri, manifest_sha256="b" * 64, n_images=4, num_patches=16, embed_dim=8,
                     num_heads=2, unit_size=2)


@pytest.mark.faults
def test_cache_attribute_holds_redacted_urls_and_the_key_ignores_them(tmp_path: Path) -> None:
    """The key is unchanged by a URL secret (URLs are not in it); the stored attribute is redacted; a spec read back
    gets its working URLs again only where the stored ones are their redaction."""
    s = url_secrets("user", "sig")
    checkpoint = f"s3://AKIAEXAMPLE:{s['user']}@models/base.pth"
    manifest = f"https://h.invalid/m.parquet?X-Amz-Signature={s['sig']}&X-Amz-Expires=60"
    spec = tiny_spec(checkpoint, manifest)
    assert spec.key == tiny_spec("s3://models/base.pth", "https://h.invalid/m.parquet").key
    cache = tmp_path / "cache"
    create_or_open(str(cache), spec)
    n, found = scan_tree(cache, tuple(s.values()))
    assert n > 0 and found == {}
    stored = open_cache(str(cache)).spec
    assert (stored.checkpoint, stored.manifest_uri, stored.key) == \
        ("s3://models/base.pth", "https://h.invalid/m.parquet?X-Amz-Signature=<redacted>&X-Amz-Expires=60", spec.key)
    assert stored.with_working_urls(checkpoint, manifest) == spec
    assert stored.with_working_urls("s3://elsewhere/base.pth", None).checkpoint == "s3://models/base.pth"


@pytest.mark.faults
def test_ledger_rows_and_lines_hold_redacted_urls(tmp_path: Path, all_logs: pytest.LogCaptureFixture) -> None:
    s = url_secrets("user", "token")
    cache = str(tmp_path / "cache")
    ledger.record_run(cache, run_name="r1", run_dir=f"https://u:{s['user']}@h.invalid/runs/r1?token={s['token']}",
                      target_source="cache", views_served=8, bytes_read=64, train_macs=10, wall_seconds=1.0,
                      epochs=1.0, base_macs_per_view=3)
    _, runs = ledger.read_ledger(cache)
    assert runs.column("run_dir").to_pylist() == ["https://h.invalid/runs/r1?token=<redacted>"]
    assert scan_tree(tmp_path, tuple(s.values()))[1] == {} and leaks(all_logs.text, tuple(s.values())) == []


@pytest.mark.faults
@pytest.mark.usefixtures("ray_cluster")
def test_no_url_secret_in_anything_a_local_run_writes_prints_or_logs(
        tmp_path: Path, fmnist_dir: Path, all_logs: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    """``run_pipeline.py run`` on the tiny config with a secret in every URL field; grep all the run leaves.

    base.checkpoint and data.path are local files whose names carry a presigned-style query (the run reads them);
    data.test_path is an https URL with userinfo and a GCS signature. The data.path secret is part of the image
    URIs, so the manifest (the data the extraction actors read) must and does hold it; nothing else may."""
    s = url_secrets("cred", "token", "sig", "data", "user", "goog")
    inputs, root = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    checkpoint = inputs / (f"base.pth?X-Amz-Credential={s['cred']}&X-Amz-Security-Token={s['token']}"
                           f"&X-Amz-Signature={s['sig']}")
    torch.manual_seed(0)
    torch.save({"model": build_vit(base_timm_kwargs(load_config(TINY))).state_dict()}, checkpoint)
    for kind in ("images-idx3", "labels-idx1"):
        (inputs / f"train-{kind}-ubyte.gz?sig={s['data']}").symlink_to(fmnist_dir / f"train-{kind}-ubyte.gz")
    data_path = f"{inputs}/train-images-idx3-ubyte.gz?sig={s['data']}"
    overrides = [f"output_root={root}", f"base.checkpoint={json.dumps(str(checkpoint))}",
                 f"data.path={json.dumps(data_path)}",
                 f"data.test_path=https://u:{s['user']}@example.invalid/t10k.gz?X-Goog-Signature={s['goog']}",
                 "data.limit=64", "train.epochs=1", "extract.unit_size=32", "extract.batch_size=32",
                 "train.global_batch=32", "extract.num_actors=0", "train.num_workers=0"]  # in-process: the same
    run_pipeline.main(["--log-level", "DEBUG", "run", "--config", TINY, *overrides])  # code, its logs all captured
    printed = capsys.readouterr()

    everything = tuple(s.values())
    n_files, found = scan_tree(root, everything)
    manifests = {f for f in found if Path(f).parent.name == "manifests"}
    assert manifests and all(found[f] == [s["data"]] for f in manifests)  # the image URIs: the data plane
    assert {f: v for f, v in found.items() if f not in manifests} == {}
    assert leaks(all_logs.text, everything) == [] and leaks(printed.out + printed.err, everything) == []
    cache_dir = next((root / "caches").iterdir())
    attrs = json.loads((cache_dir / "zarr.json").read_text())["attributes"]
    assert attrs["tec_cache"]["base_model"]["checkpoint"].endswith(
        "base.pth?X-Amz-Credential=<redacted>&X-Amz-Security-Token=<redacted>&X-Amz-Signature=<redacted>")
    assert attrs["tec_config"]["data"]["test_path"] == "https://example.invalid/t10k.gz?X-Goog-Signature=<redacted>"
    run_dir = next((root / "runs").iterdir())
    assert json.loads((run_dir / "config.json").read_text())["checkpoint_url"].endswith("X-Amz-Signature=<redacted>")
    assert (run_dir / "export" / "encoder.pth").exists()
    # in memory the job keeps the working URL: the cache found again for this config names the real file
    assert locate_cache(load_config(TINY, overrides)).spec.checkpoint == str(checkpoint)
    record("input", input=f"URL secrets: tiny local run ({n_files} files, {len(all_logs.records)} log records)",
           outcome="no secret outside the manifest's image URIs")
