"""Object-store fault injection: a restartable moto server and a fault-injecting reverse proxy in front of it.

Everything listens on 127.0.0.1 only. :class:`FaultProxy` forwards every request to the moto server and applies
per-request rules, first match wins:

* ``status``: answer an S3-style XML error (default 503 ``ServiceUnavailable``; 403 is ``SignatureDoesNotMatch``
  echoing the access key id as AWS does) without forwarding;
* ``delay``: sleep, then forward (a slow server; past the client's read timeout it becomes a timeout);
* ``drop``: a GET is forwarded and its response cut off mid-body (headers announce the full length, half the body
  is sent, the socket is closed); any other method is read and the connection closed without an answer (the
  request never reaches the store).

A rule matches a method (None: any) and a regular expression searched in the request path (bucket/key); it fires for
its next ``count`` matching requests (None: until removed). The proxy counts requests and injected faults by kind,
and the body bytes of its GET answers by path. Its ``bandwidth`` (bytes/s, None: uncapped) paces every answer body
through one shared link, like a node's network interface.
It never logs request headers (they carry the access key id in ``Authorization``).

:class:`MotoServer` is a ``ThreadedMotoServer`` on a fixed port that can be stopped and started again: moto keeps
its state in the process's backends, so objects written before a restart are still there after it.

Fixture ``faulty_s3`` (import it into a test module: ``from tests.faults.s3_faults import faulty_s3  # noqa: F401``)
gives a fresh bucket behind the proxy, with ``TEC_S3_ENDPOINT_URL``/``AWS_ENDPOINT_URL`` pointing at the proxy and
botocore's own retries reduced to 2 attempts (``AWS_MAX_ATTEMPTS``) so each fault is visible to
:func:`infra.storage.with_retries` within a test's time budget.
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from infra import storage
from tests.faults import figures

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer",
                         "upgrade", "content-length"})
_ERROR_CODES = {403: "SignatureDoesNotMatch", 500: "InternalError", 502: "BadGateway", 503: "ServiceUnavailable",
                504: "GatewayTimeout"}
_KEY_ID = re.compile(r"Credential=([^/,\s]+)/")


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Rule:
    """One fault rule of a :class:`FaultProxy`.

    Attributes:
        kind: ``status``, ``delay`` or ``drop``.
        method: HTTP method to match, None for any.
        path: regular expression searched in the request path, None for any.
        count: how many matching requests it fires for; None for every one until removed.
        every: fire on every ``every``-th matching request only (1: each one), for sustained partial faults.
        status: HTTP status of a ``status`` rule.
        delay_s: seconds a ``delay`` rule waits before forwarding.
        fired: how many times it fired so far.
    """

    kind: str
    method: str | None = None
    path: str | None = None
    count: int | None = 1
    status: int = 503
    delay_s: float = 0.0
    every: int = 1
    fired: int = 0
    seen: int = 0

    def matches(self, method: str, path: str) -> bool:
        """Whether the rule fires for this request (it matches, has firings left, and it is its turn)."""
        if self.count is not None and self.fired >= self.count:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.path is not None and re.search(self.path, path) is None:
            return False
        self.seen += 1
        return (self.seen - 1) % self.every == 0


@dataclass
class ProxyStats:
    """Counters of a :class:`FaultProxy`: requests seen by method, faults injected by kind, and the body bytes of
    the GET answers it sent by request path (``get_bytes``; ``get_requests`` counts those GETs)."""

    requests: Counter = field(default_factory=Counter)
    injected: Counter = field(default_factory=Counter)
    paths: list[tuple[str, str, str]] = field(default_factory=list)
    get_bytes: Counter = field(default_factory=Counter)
    get_requests: Counter = field(default_factory=Counter)


class FaultProxy:
    """A threaded HTTP reverse proxy on loopback in front of ``upstream`` (``host:port``) that injects faults.

    Args:
        upstream_port: port of the S3 server on 127.0.0.1.
        bandwidth: cap on the body bytes per second it sends, over all connections together (one shared link);
            None: uncapped. Settable later (``proxy.bandwidth = 20e6``).
    """

    def __init__(self, upstream_port: int, bandwidth: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.bandwidth = bandwidth
        self._link_free_at = 0.0
        self.rules: list[Rule] = []
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Silence the default per-request stderr line."""

            def _handle(self) -> None:
                try:
                    proxy._serve(self)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its read timeout)
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815 - stdlib naming

        self._server = ThreadingHTTPServer((LOOPBACK, free_port()), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>`` of the proxy."""
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def add(self, kind: str, method: str | None = None, path: str | None = None, count: int | None = 1,
            status: int = 503, delay_s: float = 0.0, every: int = 1) -> Rule:
        """Add a rule (see :class:`Rule`) and return it."""
        if kind not in ("status", "delay", "drop"):
            raise ValueError(f"unknown fault kind {kind!r}")
        rule = Rule(kind, method, path, count, status, delay_s, every)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule (the proxy then forwards everything untouched)."""
        with self._lock:
            self.rules.clear()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _take_rule(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.stats.requests[method] += 1
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.fired += 1
                    self.stats.injected[rule.kind if rule.kind != "status" else f"http_{rule.status}"] += 1
                    self.stats.paths.append((rule.kind, method, path))
                    return rule
        return None

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        method, path = h.command, h.path.split("?", 1)[0]
        rule = self._take_rule(method, path)
        if rule is not None and rule.kind == "status":
            _send_error(h, rule.status)
            return
        if rule is not None and rule.kind == "drop" and method != "GET":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if rule is not None and rule.kind == "delay":
            time.sleep(rule.delay_s)
        try:
            status, reason, headers, data = self._forward(h, body)
        except OSError:
            _send_error(h, 502)
            return
        h.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                h.send_header(name, value)
        length = next((v for n, v in headers if n.lower() == "content-length"), None)
        h.send_header("Content-Length", length if method == "HEAD" and length is not None else str(len(data)))
        h.end_headers()
        if method == "HEAD":
            return
        if rule is not None and rule.kind == "drop":
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if method == "GET":
            with self._lock:
                self.stats.get_bytes[path] += len(data)
                self.stats.get_requests[path] += 1
        self._pace(len(data))
        h.wfile.write(data)

    def _pace(self, n: int) -> None:
        """Sleep until ``n`` more bytes fit the shared link's ``bandwidth`` (no-op when uncapped)."""
        if not self.bandwidth or not n:
            return
        with self._lock:
            start = max(time.monotonic(), self._link_free_at)
            self._link_free_at = start + n / self.bandwidth
            done = self._link_free_at
        time.sleep(max(0.0, done - time.monotonic()))

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(LOOPBACK, self.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "expect"}
            headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body if body or h.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    """The request body (Content-Length or chunked transfer encoding)."""
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(h.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline().strip():
                    pass
                return b"".join(parts)
            parts.append(h.rfile.read(size))
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else b""


def _send_error(h: BaseHTTPRequestHandler, status: int) -> None:
    """An S3-style XML error; a 403 echoes the request's access key id in ``AWSAccessKeyId``, as AWS does."""
    code = _ERROR_CODES.get(status, "InternalError")
    extra = ""
    if status == 403:
        found = _KEY_ID.search(h.headers.get("Authorization", ""))
        extra = f"<AWSAccessKeyId>{found.group(1) if found else ''}</AWSAccessKeyId>"
    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected fault '
               f"{status}</Message>{extra}<RequestId>fault</RequestId></Error>").encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/xml")
    h.send_header("Content-Length", str(len(payload)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(payload)


class MotoServer:
    """A moto S3 server on 127.0.0.1 and a fixed port that can be stopped and restarted (state survives)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: Any = None
        self.restarts = 0
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.start()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>`` of the server."""
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        """Start serving (again) on the same port."""
        from moto.server import ThreadedMotoServer

        if self._server is not None:
            return
        for _ in range(50):
            try:
                self._server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)
                self._server.start()
                return
            except OSError:  # the port is still in TIME_WAIT from the previous run
                self._server = None
                time.sleep(0.1)
        raise RuntimeError(f"cannot restart moto on port {self.port}")

    def stop(self) -> None:
        """Stop serving: connections are refused until :meth:`start`."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def restart_after(self, down_s: float) -> None:
        """Stop now and start again ``down_s`` seconds later (blocking)."""
        self.stop()
        time.sleep(down_s)
        self.start()
        self.restarts += 1


@dataclass
class FaultyS3:
    """What the ``faulty_s3`` fixture yields.

    Attributes:
        url: ``s3://<fresh bucket>/data`` reached through the proxy.
        bucket: the bucket name.
        proxy: the fault-injecting proxy (the environment's endpoint).
        moto: the moto server behind it.
    """

    url: str
    bucket: str
    proxy: FaultProxy
    moto: MotoServer

    def client(self, direct: bool = True) -> Any:
        """A boto3 client talking to moto directly (for checks that must not see faults) or via the proxy."""
        import boto3

        return boto3.client("s3", endpoint_url=self.moto.endpoint if direct else self.proxy.endpoint,
                            region_name="us-east-1")

    def objects(self) -> dict[str, bytes]:
        """Every object of the bucket, read directly from moto: ``{key: bytes}``."""
        client = self.client()
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
        return out


FAULT_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_MAX_ATTEMPTS": "2",
    "AWS_RETRY_MODE": "standard",
    "TEC_S3_READ_TIMEOUT_S": "5",
    "TEC_S3_CONNECT_TIMEOUT_S": "2",
}
_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "TEC_S3_REGION")


@pytest.fixture
def faulty_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyS3]:
    """A fresh bucket on a private moto server reached through a :class:`FaultProxy` (see the module docstring)."""
    moto = MotoServer()
    proxy = FaultProxy(moto.port)
    for name in _UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**FAULT_ENV, "AWS_ENDPOINT_URL": proxy.endpoint,
                        "TEC_S3_ENDPOINT_URL": proxy.endpoint}.items():
        monkeypatch.setenv(name, value)
    storage.clear_filesystem_cache()
    bucket = f"tec-fault-{uuid.uuid4().hex[:12]}"
    faulty = FaultyS3(f"s3://{bucket}/data", bucket, proxy, moto)
    faulty.client().create_bucket(Bucket=bucket)
    try:
        yield faulty
    finally:
        storage.clear_filesystem_cache()
        proxy.close()
        moto.stop()


def record(section: str, **fields: Any) -> None:
    """Append one result row to ``$TEC_FAULT_REPORT`` (JSON lines), if set: ``section`` plus ``fields``, and where it
    was measured (:func:`tests.faults.figures.write`).

    ``section="fault"`` rows (``kind``, ``injected``, ``survived``, ``data_lost``, what was compared) and
    ``section="input"`` rows (``input``, ``outcome``) become docs/reliability.md's tables (:mod:`tests.faults.report`).
    """
    figures.write(figures.REPORT_VAR, {"section": section, **fields})
