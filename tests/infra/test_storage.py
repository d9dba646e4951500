"""infra.storage: round trips on a local path and on S3 (moto), atomic writes, retries, zarr stores."""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import zarr
from botocore.exceptions import ClientError
from zarr.storage import FsspecStore, LocalStore

from infra import retry, storage

NO_WAIT = storage.RetryPolicy(attempts=3, base_delay_s=0.0)


@pytest.fixture(params=["local", "s3"])
def root_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_url")


def test_bytes_round_trip_list_delete(root_url: str) -> None:
    a, b = storage.join(root_url, "x", "a.bin"), storage.join(root_url, "x/y", "b.json")
    assert not storage.exists(a)
    storage.write_bytes(a, b"\x00\x01payload")
    storage.write_bytes(b, b"{}")
    storage.write_bytes(a, b"replaced")
    assert storage.read_bytes(a) == b"replaced"
    assert storage.exists(a) and storage.size(a) == len(b"replaced")
    assert storage.list_objects(storage.join(root_url, "x")) == {"a.bin": 8, "y/b.json": 2}
    storage.delete(a)
    storage.delete(a)
    assert storage.list_objects(storage.join(root_url, "x")) == {"y/b.json": 2}
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(a)
    assert storage.list_objects(storage.join(root_url, "nothing")) == {}


def test_local_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/d/obj"
    storage.write_bytes(url, b"abc")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["obj"]
    assert storage.read_bytes(str(tmp_path / "d" / "obj")) == b"abc"


def test_s3_options_come_from_environment(moto_endpoint: str) -> None:
    opts = storage.storage_options("s3")
    assert opts["endpoint_url"] == moto_endpoint
    assert not any("key" in k or "secret" in k or "token" in k for k in opts)
    assert storage.storage_options("file") == {}


def test_zarr_store_kinds(tmp_path: Path, s3_url: str) -> None:
    assert isinstance(storage.zarr_store(str(tmp_path)), LocalStore)
    assert isinstance(storage.zarr_store(f"file://{tmp_path}"), LocalStore)
    store = storage.zarr_store(s3_url)
    assert isinstance(store, FsspecStore)
    zarr.create_array(store, name="a", shape=(4,), dtype="int32")[:] = [1, 2, 3, 4]
    assert zarr.open_array(storage.zarr_store(s3_url, read_only=True), path="a")[:].tolist() == [1, 2, 3, 4]


_READ_AND_EXIT = """
import gc, sys
import zarr
from infra import storage, zarr_store
url = sys.argv[1]
dropped = storage.zarr_store(url, read_only=True)  # closed when collected
assert zarr.open_array(dropped, path="a")[:].tolist() == [1, 2, 3, 4]
del dropped
gc.collect()
kept = storage.zarr_store(url, read_only=True)  # still open at exit
assert zarr.open_array(kept, path="a")[:].tolist() == [1, 2, 3, 4]
zarr_store.close_sessions()  # a closed store opens a new session on its next request
assert zarr.open_array(kept, path="a")[1:3].tolist() == [2, 3]
print("read", flush=True)
"""


def test_a_process_that_read_from_s3_exits_with_its_sessions_closed(s3_url: str) -> None:
    zarr.create_array(storage.zarr_store(s3_url), name="a", shape=(4,), dtype="int32")[:] = [1, 2, 3, 4]
    done = subprocess.run([sys.executable, "-c", _READ_AND_EXIT, s3_url], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout.strip() == "read", done.stderr
    assert "Unclosed" not in done.stderr, done.stderr


def test_filesystems_are_per_process() -> None:
    fs = storage.filesystem("file:///tmp")
    assert storage.filesystem("/tmp") is fs
    storage.clear_filesystem_cache()
    assert storage.filesystem("/tmp") is not fs


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "boom"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def _http_error(status: int) -> Exception:
    """What fsspec's HTTP filesystem raises for an HTTP error status: aiohttp's ClientResponseError."""
    import aiohttp
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    url = URL("https://models.example.com/w.pth")
    info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(info, (), status=status, message="boom")


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.EBUSY, "SlowDown"), ConnectionResetError("reset"), TimeoutError("slow"), _client_error(503, "X"),
     _client_error(429, "TooManyRequests"), _client_error(400, "RequestTimeout"), _http_error(503), _http_error(429)],
)
def test_retry_recovers_from_transient_errors(exc: Exception) -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise exc
        return "ok"

    assert storage.with_retries("write", "s3://b/k", flaky, NO_WAIT) == "ok"
    assert len(calls) == 3


def test_retry_gives_up_with_clear_error() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise OSError(errno.EBUSY, "503 Service Unavailable")

    with pytest.raises(storage.StorageError, match=r"write s3://b/key failed after 3 attempts.*Unavailable"):
        storage.with_retries("write", "s3://b/key", down, NO_WAIT)
    assert len(calls) == 3


@pytest.mark.parametrize("exc", [PermissionError("denied"), ValueError("bad"), _client_error(400, "Invalid"),
                                 _http_error(403), _http_error(404)])
def test_permanent_errors_are_not_retried(exc: Exception) -> None:
    calls = []

    def bad() -> None:
        calls.append(1)
        raise exc

    with pytest.raises(storage.StorageError, match="read s3://b/key failed"):
        storage.with_retries("read", "s3://b/key", bad, NO_WAIT)
    assert len(calls) == 1


def test_missing_object_is_not_retried() -> None:
    calls = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("s3://b/key")

    with pytest.raises(FileNotFoundError):
        storage.with_retries("read", "s3://b/key", missing, NO_WAIT)
    assert len(calls) == 1


def test_read_bytes_retries_a_failing_backend(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = storage.join(s3_url, "obj")
    storage.write_bytes(url, b"data")
    fs, _ = storage.resolve(url)
    real, failures = fs.cat_file, []

    def once_down(path: str, *args: object, **kwargs: object) -> bytes:
        if not failures:
            failures.append(path)
            raise OSError(errno.EREMOTEIO, "500 InternalError")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", once_down)
    assert storage.read_bytes(url, NO_WAIT) == b"data"
    assert len(failures) == 1


def test_s3_timeouts_come_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEC_S3_READ_TIMEOUT_S", "7.5")
    monkeypatch.setenv("TEC_S3_CONNECT_TIMEOUT_S", "2")
    assert storage.storage_options("s3")["config_kwargs"] == {"read_timeout": 7.5, "connect_timeout": 2.0}
    monkeypatch.setenv("TEC_S3_READ_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="TEC_S3_READ_TIMEOUT_S must be a number of seconds, got 'soon'"):
        storage.storage_options("s3")


def test_persistent_transient_failure_is_marked_transient() -> None:
    def down() -> None:
        raise ConnectionResetError("reset")

    with pytest.raises(storage.StorageError) as info:
        storage.with_retries("read", "s3://b/k", down, NO_WAIT)
    assert info.value.transient
    with pytest.raises(storage.StorageError) as info:
        storage.with_retries("read", "s3://b/k", lambda: (_ for _ in ()).throw(PermissionError("no")), NO_WAIT)
    assert not info.value.transient


def test_retries_nested_in_a_retry_loop_do_not_multiply() -> None:
    """An async retried call inside a with_retries loop makes one attempt per outer attempt (3, not 3 x 3)."""
    import asyncio

    calls = []

    async def flaky() -> None:
        calls.append(1)
        raise TimeoutError("slow")

    assert_raises = pytest.raises(storage.StorageError, match="failed after 3 attempts")
    with assert_raises:
        asyncio.run(storage.with_retries_async("read", "s3://b/k", flaky, NO_WAIT))
    assert len(calls) == 3
    calls.clear()
    with assert_raises:
        storage.with_retries("write", "s3://b/k", lambda: asyncio.run(
            storage.with_retries_async("read", "s3://b/k", flaky, NO_WAIT)), NO_WAIT)
    assert len(calls) == 3


def test_default_policy_is_looked_up_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "DEFAULT_RETRY", storage.RetryPolicy(attempts=2, base_delay_s=0.0))
    calls = []

    def down() -> None:
        calls.append(1)
        raise TimeoutError("slow")

    with pytest.raises(storage.StorageError, match="after 2 attempts"):
        storage.with_retries("read", "s3://b/k", down)
    assert len(calls) == 2


def test_zarr_store_retries_a_transient_read(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = storage.zarr_store(s3_url)
    assert isinstance(store, storage.RetryingFsspecStore)
    zarr.create_array(store, name="a", shape=(4,), dtype="int32")[:] = [1, 2, 3, 4]
    reader = storage.zarr_store(s3_url, read_only=True)
    real, failures = reader.fs._cat_file, []

    async def once_down(path: str, *args: object, **kwargs: object) -> bytes:
        if not failures:
            failures.append(path)
            raise OSError(errno.EREMOTEIO, "500 InternalError")
        return await real(path, *args, **kwargs)

    monkeypatch.setattr(retry, "DEFAULT_RETRY", NO_WAIT)
    monkeypatch.setattr(reader.fs, "_cat_file", once_down)
    assert zarr.open_array(reader, path="a")[:].tolist() == [1, 2, 3, 4]
    assert len(failures) == 1


# ------------------------------------------------------------------------------------- secrets in URLs
SECRET = "S3CR3T-9f2e"
REDACTED_CASES = [
    (f"s3://AKIAEXAMPLE:{SECRET}@bucket/base.pth", "s3://bucket/base.pth"),
    (f"https://alice:p@ss{SECRET}@example.com:8443/x", "https://example.com:8443/x"),  # raw '@' in the password
    (f"https://b.s3.amazonaws.com/k.pth?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F{SECRET}"
     f"&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token={SECRET}"
     f"&X-Amz-Signature={SECRET}",
     "https://b.s3.amazonaws.com/k.pth?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=<redacted>"
     "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=<redacted>"
     "&X-Amz-Signature=<redacted>"),
    (f"https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIA{SECRET}&Expires=1&Signature={SECRET}",
     "https://b.s3.amazonaws.com/k?AWSAccessKeyId=<redacted>&Expires=1&Signature=<redacted>"),
    (f"https://storage.googleapis.com/b/o?X-Goog-Credential=sa{SECRET}&X-Goog-Signature={SECRET}",
     "https://storage.googleapis.com/b/o?X-Goog-Credential=<redacted>&X-Goog-Signature=<redacted>"),
    (f"https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&sig={SECRET}",
     "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&sp=r&sig=<redacted>"),
    (f"https://h/x?token={SECRET}&part=2#access_token={SECRET}", "https://h/x?token=<redacted>&part=2#access_token=<redacted>"),
    (f"s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPx{SECRET}@bucket/x.pth", "s3://bucket/x.pth"),  # raw '/'
    (f"s3://AKIAEXAMPLE:a/b{SECRET}@bucket/x.pth?versionId=3", "s3://bucket/x.pth?versionId=3"),
    (f"/data/train.gz?X-Amz-Signature={SECRET}", "/data/train.gz?X-Amz-Signature=<redacted>"),
]
CLEAN = ["s3://bucket/caches/ab12", "/tmp/outputs/runs/tiny-1", "idx:///data/train.gz#17", "memory://x/y?part=1",
         "https://example.com/a/b.pth", "gs://bucket/o?generation=3", "s3://bucket/models/vit@v2/x.pth",
         "https://example.com/u/@alice/x.png"]


@pytest.mark.parametrize(("url", "expected"), REDACTED_CASES)
def test_redact_url_strips_userinfo_and_presigned_secrets(url: str, expected: str) -> None:
    assert storage.redact_url(url) == expected
    assert storage.redact_url(expected) == expected  # idempotent
    assert SECRET not in storage.redact_url(url) and storage.has_secret(url)


@pytest.mark.parametrize("url", CLEAN)
def test_redact_url_leaves_urls_without_secrets_alone(url: str) -> None:
    assert storage.redact_url(url) == url and not storage.has_secret(url)


def test_redact_text_finds_every_url_in_a_message() -> None:
    urls = [url for url, _ in REDACTED_CASES]
    message = (f"read {urls[0]} failed; retried '{urls[2]}' and \"{urls[5]}\" then {urls[-1]}, see also "
               + json.dumps({"checkpoint_url": urls[1], "manifest_url": urls[3]}))
    clean = storage.redact_text(message)
    assert SECRET not in clean
    assert "read s3://bucket/base.pth failed" in clean and "'https://b.s3.amazonaws.com/k.pth?" in clean
    assert json.loads(clean.split("see also ", 1)[1])["checkpoint_url"] == "https://example.com:8443/x"


def _shown(exc: BaseException) -> str:
    """Everything a user could see of ``exc``: its message, its repr and the traceback Python would print."""
    return f"{exc}\n{exc!r}\n" + "".join(traceback.format_exception(exc))


def test_storage_errors_never_show_a_url_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    query = f"?X-Amz-Signature={SECRET}"
    with pytest.raises(FileNotFoundError) as missing:
        storage.read_bytes(f"{tmp_path}/absent.bin{query}")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(storage.StorageError) as permanent:  # a parent that is a file: NotADirectoryError
        storage.write_bytes(f"{tmp_path}/file/child{query}", b"x", NO_WAIT)
    url = f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"

    def down() -> None:
        raise ConnectionError(f"cannot reach {url}")

    with caplog.at_level(logging.WARNING), pytest.raises(storage.StorageError) as transient:
        storage.with_retries("read", url, down, NO_WAIT)
    assert transient.value.transient and not permanent.value.transient
    assert "retry 1/2" in caplog.text and SECRET not in caplog.text
    for info in (missing, permanent, transient):
        assert SECRET not in _shown(info.value), _shown(info.value)
    assert "X-Amz-Signature=<redacted>" in str(permanent.value) and "s3://bucket/x" in str(transient.value)
    assert isinstance(missing.value, FileNotFoundError) and "absent.bin" in str(missing.value)


def test_a_cause_whose_message_holds_a_secret_is_not_chained() -> None:
    """An HTTP client's message can name the presigned URL a redirect led to, though the URL we read has none."""
    def refused() -> None:
        raise PermissionError(f"403 Forbidden, url=https://cdn.example.com/w.pth?X-Amz-Signature={SECRET}")

    with pytest.raises(storage.StorageError) as info:
        storage.with_retries("read", "https://models.example.com/w.pth", refused, NO_WAIT)
    assert info.value.__cause__ is None and SECRET not in _shown(info.value)
    assert "X-Amz-Signature=<redacted>" in str(info.value)
