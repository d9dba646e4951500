"""Helpers shared by the benchmark scripts (``bench_extract.py``, ``bench_train.py``, ``bench_reader.py``,
``bench_codecs.py``, ``bench_local_cache.py``).

* CPU accounting: :class:`CpuMeter` (machine-wide busy cores from ``/proc/stat``), :func:`timed_phase`,
  :class:`ProcessCpu` (busy cores split into this process, named child groups, other children and others' load),
  :func:`child_pids`;
* S3: :func:`moto_server` (a moto S3 server on 127.0.0.1 in a spawned child process, with this process's S3 clients
  pointed at it), :func:`create_bucket`, :func:`copy_to_s3`;
* set-up: :func:`fresh_manifest` (a Fashion-MNIST ``idx://`` manifest in a fresh work directory),
  :func:`write_manifest_and_checkpoint` (and a randomly initialised MAE-format base checkpoint);
* command line and report: :func:`add_int_options`, :func:`add_output_args`, :func:`config_of`, :func:`row`,
  :func:`bench_main` (logging, torch threads, timing, JSON output, the printed table).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from infra import storage
from infra.logs import setup_logging
from stages.manifest import manifest_from_idx, write_manifest
from tec_model import build_vit

FMNIST_IMAGES = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
LOOPBACK = "127.0.0.1"
RANDOM_CHECKPOINT = "random init (torch.manual_seed(0)), MAE format {'model': state_dict}"


# ------------------------------------------------------------------------------------------------ CPU accounting
class CpuMeter:
    """Machine-wide busy cores between :meth:`start` and :meth:`stop`, from ``/proc/stat`` (nan elsewhere)."""

    def __init__(self) -> None:
        self._start: tuple[int, int] | None = None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> float:
        end = self._read()
        if self._start is None or end is None or end[0] == self._start[0]:
            return float("nan")
        total, idle = end[0] - self._start[0], end[1] - self._start[1]
        return (total - idle) / total * (os.cpu_count() or 1)


@contextmanager
def timed_phase(record: dict[str, Any]) -> Iterator[None]:
    """Store ``seconds``, machine-wide ``busy_cores`` and this process's ``own_cores`` of the block in ``record``."""
    meter = CpuMeter()
    meter.start()
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    record["seconds"] = time.perf_counter() - t0
    record["busy_cores"] = meter.stop()
    record["own_cores"] = (time.process_time() - c0) / record["seconds"]


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, user + system clock ticks so far) of every process visible in ``/proc`` (empty elsewhere)."""
    table: dict[int, tuple[int, int]] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return table
    for name in entries:
        try:
            data = Path("/proc", name, "stat").read_text()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid ... utime(11) stime(12)
        table[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    return table


class ProcessCpu:
    """Machine busy cores over a window, split into this process, its children and everybody else.

    ``busy`` comes from ``/proc/stat`` (as :class:`CpuMeter`); ``self`` is this process; each named group of child
    pids (e.g. the moto server) is reported on its own; ``children`` is every other descendant (the DataLoader
    workers); ``others`` = busy - all of ours: other users' load (plus kernel work and processes that ended inside
    the window). All in cores (CPU seconds per second).
    """

    def __init__(self, groups: dict[str, set[int]] | None = None) -> None:
        self.groups = groups or {}
        self._meter = CpuMeter()
        self._start: dict[int, tuple[int, int]] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._start = _proc_table()
        self._meter.start()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        busy = self._meter.stop()
        seconds = time.perf_counter() - self._t0
        end = _proc_table()
        if not end:
            return {"busy": busy}
        parent = {pid: ppid for pid, (ppid, _) in {**self._start, **end}.items()}
        me = os.getpid()

        def descends(pid: int) -> bool:
            seen = set()
            while pid in parent and pid not in seen and pid > 1:
                seen.add(pid)
                pid = parent[pid]
                if pid == me:
                    return True
            return False

        def cores(pids: Iterable[int]) -> float:
            ticks = sum(end[p][1] - self._start.get(p, (0, 0))[1] for p in pids if p in end)
            return ticks / os.sysconf("SC_CLK_TCK") / seconds

        grouped = set().union(*self.groups.values()) if self.groups else set()
        out = {"busy": busy, "self": cores([me])}
        out.update({name: cores(pids) for name, pids in self.groups.items()})
        out["children"] = cores([p for p in end if p not in grouped and descends(p)])
        out["others"] = busy - sum(v for k, v in out.items() if k != "busy")
        return out


def child_pids() -> set[int]:
    """Current descendants of this process."""
    table, me = _proc_table(), os.getpid()
    kids: set[int] = set()
    frontier = {me}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - kids
        kids |= frontier
    return kids


# ------------------------------------------------------------------------------------------------ S3 (moto)
def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _serve_moto(port: int, ready: Any, stop: Any) -> None:
    """Child-process body: a moto S3 server on 127.0.0.1:``port`` until ``stop`` is set."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    ready.set()
    stop.wait()
    server.stop()


@contextmanager
def moto_server() -> Iterator[str]:
    """Run a moto S3 server on loopback in a spawned process; point this process's S3 clients at it.

    Sets dummy credentials and ``TEC_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL`` (read by :mod:`infra.storage`) for the
    duration, then restores the environment. Yields the endpoint URL.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_serve_moto, args=(port, ready, stop), daemon=True)
    proc.start()
    deadline = time.monotonic() + 60
    while not ready.wait(0.2):
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the moto S3 server did not start (exit code {proc.exitcode})")
    endpoint = f"http://{LOOPBACK}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "TEC_S3_ENDPOINT_URL": endpoint}
    unset = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "TEC_S3_REGION")
    saved = {k: os.environ.get(k) for k in (*env, *unset)}
    os.environ.update(env)
    for name in unset:
        os.environ.pop(name, None)
    storage.clear_filesystem_cache()
    try:
        yield endpoint
    finally:
        storage.clear_filesystem_cache()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def create_bucket(endpoint: str) -> str:
    """A fresh bucket ``tec-bench-<random>`` on the moto server at ``endpoint``; returns ``s3://<bucket>/cache``."""
    import boto3

    bucket = f"tec-bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/cache"


def copy_to_s3(local_url: str, s3_url: str) -> dict:
    """Upload every object of a local cache to ``s3_url`` (one PUT each); returns MB and seconds."""
    objects = storage.list_objects(local_url)
    record: dict[str, Any] = {"objects": len(objects), "mb": sum(objects.values()) / 1e6}
    with timed_phase(record):
        for rel in objects:
            storage.write_bytes(storage.join(s3_url, rel), Path(local_url, rel).read_bytes())
    record["mb_per_s"] = record["mb"] / record["seconds"]
    return record


# ------------------------------------------------------------------------------------------------ set-up
def fresh_manifest(workdir: Path, idx: Path, images: int) -> str:
    """Wipe and recreate ``workdir``; write a manifest of the first ``images`` records of the IDX file ``idx``
    (``idx://`` URIs) there. Returns its URL."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    manifest_url = str(workdir / "manifest.parquet")
    write_manifest(manifest_from_idx(idx, limit=images), manifest_url)
    return manifest_url


def write_manifest_and_checkpoint(workdir: Path, idx: Path, images: int,
                                  base_kwargs: dict[str, Any]) -> tuple[str, str]:
    """:func:`fresh_manifest`, and a randomly initialised base ViT (``torch.manual_seed(0)``) in MAE format
    ``{'model': state_dict}``. Returns ``(manifest_url, checkpoint_url)``."""
    manifest_url = fresh_manifest(workdir, idx, images)
    torch.manual_seed(0)
    checkpoint_url = str(workdir / "base_mae.pth")
    torch.save({"model": build_vit(base_kwargs).state_dict()}, checkpoint_url)
    return manifest_url, checkpoint_url


# ------------------------------------------------------------------------------------------------ CLI, report
def add_int_options(p: argparse.ArgumentParser, options: dict[str, tuple[int, str]]) -> None:
    """Integer options ``--<name>``: ``{name: (default, help)}``."""
    for name, (default, text) in options.items():
        p.add_argument(f"--{name}", type=int, default=default, help=text)


def add_output_args(p: argparse.ArgumentParser, name: str) -> None:
    """``--idx``, ``--workdir`` (``outputs/bench/<name>_work``), ``--clean``, ``--out-json``
    (``outputs/bench/<name>.json``) and ``--log-level``."""
    p.add_argument("--idx", type=Path, default=FMNIST_IMAGES, help="Fashion-MNIST images IDX file")
    p.add_argument("--workdir", type=Path, default=Path(f"outputs/bench/{name}_work"),
                   help="scratch directory (deleted first; kept after the run for inspection unless --clean)")
    p.add_argument("--clean", action="store_true", help="delete the scratch directory at the end")
    p.add_argument("--out-json", type=Path, default=Path(f"outputs/bench/{name}.json"), help="all numbers as JSON")
    p.add_argument("--log-level", default="WARNING", help="log level of the pipeline's loggers")


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line arguments as JSON-ready values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def unit_breakdown(cache: Any, views_per_image: int) -> dict[str, float]:
    """Per-view milliseconds of each extraction step of a :class:`stages.cache.TargetCache`, summed over the units'
    markers (concurrent units overlap): load (read + view build), forward (model + float16 cast + copy to host),
    write (the cache write incl. hashing)."""
    load = forward = write = 0.0
    views = 0
    for unit in cache.complete_units():
        marker = cache.marker(unit)
        load += marker["timings"]["load_s"]
        forward += marker["timings"]["forward_s"]
        write += marker["seconds"]
        views += marker["n_valid"] * views_per_image
    return {"load_ms_per_view": 1e3 * load / views, "forward_ms_per_view": 1e3 * forward / views,
            "write_ms_per_view": 1e3 * write / views, "unit_busy_s": load + forward + write}


def row(label: str, value: str, note: str = "", label_width: int = 44, value_width: int = 16) -> str:
    """One line of a results table: indented label, right-aligned value, note."""
    return f"  {label:<{label_width}} {value:>{value_width}}  {note}"


def json_default(obj: Any) -> Any:
    """JSON fallback: dataclasses as dicts, anything else as its ``str``."""
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else str(obj)


def say(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def bench_main(args: argparse.Namespace, run: Callable[[argparse.Namespace, Callable[[str], None]], dict],
               render: Callable[[dict], str], default: Callable[[Any], Any] = json_default) -> int:
    """Run a benchmark: logging and torch threads from ``args``, ``run(args, say)``, every number to ``--out-json``,
    the scratch directory removed with ``--clean``, then the table ``render(results)`` and the total on stdout."""
    setup_logging(args.log_level)
    for name in ("werkzeug", "moto"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = run(args, say)
    results["total_seconds"] = time.perf_counter() - started
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(results, indent=2, default=default))
    if args.clean:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print(render(results))
    print(f"  total {results['total_seconds']:.0f} s; all numbers in {args.out_json}")
    return 0
