"""Benchmark: a remote cache's targets cross the network once per node with ``train.local_cache``.

A ViT-B/16-shaped synthetic target cache (the targets of ``bench_reader.py``: 196 × 768 features, ``k_max`` + 1 rows
of 12 × 196 attention logits, default compressor) of ``--images`` images × V views is written on local disk and
copied to a moto S3 server behind the test suite's counting, bandwidth-capping reverse proxy
(``tests/faults/s3_faults.py``: it counts the body bytes of every GET by path). Then E epochs are read by the train
stage's own reader as a training run reads them: one :class:`stages.train.data.TrainBatches` spanning the E epochs
(one reader and cache handle for the run, a fresh block LRU each epoch), iterated through ``make_loader``
(``--workers``; 0: in this process), pixels included. Runs, in one process, side by side:

* ``local disk``: the local copy (no network), before and after the S3 runs: the reference step rate;
* ``S3``: the S3 copy, no local cache: every epoch reads its chunks by byte range again;
* ``S3 + local cache``: the same with ``train.local_cache`` on a fresh directory (unbounded, ``epochs`` = E);
* ``S3 capped``, ``S3 capped + local cache``: the proxy's link capped at ``--bandwidth-mb`` MB/s.

Object-store bytes: the unit data objects' GET bytes the proxy served (metadata, markers and listings are counted
apart). Needed bytes: the stored bytes of the chunks the run's reads touch over the E epochs (every inner chunk of
a block's epoch view, read from the shard indexes of the local copy, and the whole unsharded objects), i.e. what a
reader that fetched each chunk once would transfer. Step rate: batches per second of each epoch (the first's
includes the reader's set-up); the ratio compares epochs 2..E.

Run ``.venv/bin/python benchmarks/bench_local_cache.py --help``; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from infra import storage
from stages.cache import open_cache, raw_bytes_per_view
from stages.cache.local_tier import LocalCacheSettings
from stages.train.data import SamplePlan, TrainBatches, make_loader
from stages.views import Preprocess

try:  # as ``python -m benchmarks.bench_local_cache`` or as a script (then benchmarks/ is sys.path[0])
    from benchmarks import bench_reader, common
except ImportError:  # pragma: no cover
    import bench_reader  # type: ignore[no-redef]
    import common  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the proxy lives in the test suite (tests/ is not an installed package)
    sys.path.insert(0, str(REPO))
from tests.faults.s3_faults import FaultProxy  # noqa: E402
from tests.fixtures.local_cache import DATA_PATH  # noqa: E402

_EMPTY = np.uint64(2**64 - 1)  # a shard index entry of a chunk that was never written


# ------------------------------------------------------------------------------------------------ set-up
@contextmanager
def proxied_s3() -> Iterator[tuple[str, FaultProxy]]:
    """A fresh bucket on a moto server (a child process, :func:`common.moto_server`) behind a :class:`FaultProxy`
    in this process, this process's S3 clients pointed at the proxy; yields ``(s3://<bucket>/cache, proxy)``."""
    with common.moto_server() as endpoint:
        url = common.create_bucket(endpoint)
        proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]))
        os.environ["AWS_ENDPOINT_URL"] = os.environ["TEC_S3_ENDPOINT_URL"] = proxy.endpoint  # restored on exit
        storage.clear_filesystem_cache()
        try:
            yield url, proxy
        finally:
            proxy.close()


def _inner_sizes(path: Path, grid: tuple[int, ...]) -> np.ndarray:
    """Stored bytes of each inner chunk of one shard object (``grid``: chunks per shard along each axis), from
    its index at the end of the object (zarr's default: (offset, nbytes) uint64 pairs in C order, then a CRC32C)."""
    n = int(np.prod(grid))
    with path.open("rb") as f:
        f.seek(-(16 * n + 4), os.SEEK_END)
        index = np.frombuffer(f.read(16 * n), "<u8").reshape(n, 2)[:, 1]
    return np.where(index == _EMPTY, 0, index).reshape(grid)


def needed_bytes(local_url: str, plan: SamplePlan, epochs: int) -> dict[str, int]:
    """Stored bytes, per array, of the chunks ``epochs`` epochs of ``plan`` read (each chunk counted once): every
    inner chunk holding a row of a served block in its epoch view; unsharded arrays (one chunk per unit), whole."""
    cache = open_cache(local_url)
    root = zarr.open_group(local_url, mode="r", zarr_format=3)
    touched: set[tuple[int, int]] = set()  # (row, view) of every row of every block read
    for epoch in range(epochs):
        blocks = np.unique(plan.epoch_order(epoch) // plan.block_size)
        rows = (blocks[:, None] * plan.block_size + np.arange(plan.block_size)).ravel()
        rows = rows[rows < plan.valid.size]
        touched |= set(zip(rows.tolist(), plan.views_for(epoch, rows).tolist(), strict=True))
    objects = {u: {key.split("/", 1)[0]: key for key in cache.unit_objects(u)[:-2]} for u in range(cache.n_units)}
    out: dict[str, int] = {}
    for name in objects[0]:
        arr = root[name]
        path = {u: Path(local_url, objects[u][name]) for u in objects}
        if arr.shards is None:
            out[name] = sum(path[u].stat().st_size for u in {r // cache.unit_size for r, _ in touched})
            continue
        grid = tuple(s // c for s, c in zip(arr.shards, arr.chunks, strict=True))
        rest = (0,) * (len(grid) - 2)
        sizes = {u: _inner_sizes(path[u], grid) for u in objects}
        chunks = {(r // arr.chunks[0], v) for r, v in touched}
        out[name] = sum(int(sizes[c // grid[0]][(c % grid[0], v, *rest)]) for c, v in chunks)
    return out


# ------------------------------------------------------------------------------------------------ measurements
def _get_bytes(proxy: FaultProxy | None) -> tuple[int, int]:
    """(unit data objects, everything else): body bytes of the GETs the proxy served so far."""
    if proxy is None:
        return 0, 0
    data = sum(n for path, n in proxy.stats.get_bytes.items() if DATA_PATH.search(path))
    return data, sum(proxy.stats.get_bytes.values()) - data


def read_epochs(url: str, plan: SamplePlan, args: argparse.Namespace, manifest_url: str,
                local_cache: LocalCacheSettings | None, proxy: FaultProxy | None) -> dict[str, Any]:
    """E epochs of ``url`` through the train reader as a run reads them: one :class:`TrainBatches` spanning the
    epochs and one loader; per epoch its seconds (from the previous epoch's last batch; the first epoch's include
    the reader's set-up), steps, views and bytes (the proxy's counts sampled at each epoch's first batch, so the
    loader's read-ahead lands in the epoch before)."""
    spec, pre = open_cache(url).spec, Preprocess.fashion_mnist(bench_reader.SIDE)
    ds = TrainBatches(plan, 0, 0, 0, manifest_url=manifest_url, preprocess=pre, in_chans=1, cache_url=url,
                      checked_spec=spec, local_cache=local_cache, until=args.epochs * plan.steps_per_epoch())
    epochs: list[dict[str, Any]] = []
    t0, (data0, other0) = time.perf_counter(), _get_bytes(proxy)

    def close(rec: dict[str, Any], now: float, data: int, other: int) -> None:
        rec.update(seconds=now - rec.pop("t0"), get_data_bytes=data - rec.pop("data0"),
                   get_other_bytes=other - rec.pop("other0"))
        rec["steps_per_s"] = rec["steps"] / rec["seconds"]

    for batch in make_loader(ds, num_workers=args.workers):
        now = time.perf_counter()
        if not epochs or epochs[-1]["epoch"] != int(batch["epoch"]):
            data, other = _get_bytes(proxy)
            start = t0 if not epochs else epochs[-1]["t_last"]
            if epochs:
                close(epochs[-1], start, data, other)
            epochs.append({"epoch": int(batch["epoch"]), "steps": 0, "views": 0, "object_store_bytes": 0,
                           "local_cache_bytes": 0, "t0": start, "data0": data if epochs else data0,
                           "other0": other if epochs else other0, "first_batch_s": now - start})
        rec = epochs[-1]
        rec["steps"] += 1
        rec["views"] += int(batch["indices"].numel())
        rec["object_store_bytes"] += int(batch["object_store_bytes"])
        rec["local_cache_bytes"] += int(batch["local_cache_bytes"])
        rec["t_last"] = now
    close(epochs[-1], time.perf_counter(), *_get_bytes(proxy))
    for rec in epochs:
        rec.pop("t_last", None)
    later = epochs[1:] or epochs
    return {"epochs": epochs, "get_data_bytes": sum(e["get_data_bytes"] for e in epochs),
            "get_other_bytes": sum(e["get_other_bytes"] for e in epochs),
            "later_steps_per_s": sum(e["steps"] for e in later) / sum(e["seconds"] for e in later),
            "later_steady_steps_per_s": sum(e["steps"] - 1 for e in later)
            / sum(e["seconds"] - e["first_batch_s"] for e in later)}


RUNS = ("local disk", "S3", "S3 + local cache", "S3 capped + local cache", "S3 capped", "local disk (again)")


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """Write the cache locally, copy it to S3 behind the proxy, read E epochs in every run of :data:`RUNS`."""
    workdir = args.workdir
    manifest_url = common.fresh_manifest(workdir, args.idx, args.images)
    spec = bench_reader.make_spec(args, manifest_url, bench_reader.k_max_of_config())
    local_url = str(workdir / "cache")
    say(f"writing the cache ({args.images} images x {args.views} views, ViT-B/16 shapes)")
    results: dict[str, Any] = {"config": common.config_of(args), "bytes_per_view": raw_bytes_per_view(spec),
                               "write": bench_reader.write_cache(local_url, spec, "shuffle"), "runs": {}}
    cache = open_cache(local_url)
    plan = SamplePlan(cache.valid(), block_size=cache.block_size, views_per_image=args.views, seed=0,
                      global_batch=args.batch, world_size=1, shuffle_window=args.shuffle_window)
    results["needed"] = needed_bytes(local_url, plan, args.epochs)
    results["stored_data_bytes"] = sum(
        storage.size(storage.join(local_url, key)) for u in range(cache.n_units) for key in cache.unit_objects(u)[:-2])
    say("  local disk")
    results["runs"]["local disk"] = read_epochs(local_url, plan, args, manifest_url, None, None)
    with proxied_s3() as (s3_url, proxy):
        say("copying the cache to moto S3 (through the proxy)")
        results["s3_copy"] = common.copy_to_s3(local_url, s3_url)
        for name in RUNS[1:-1]:
            say(f"  {name}")
            proxy.bandwidth = args.bandwidth_mb * 1e6 if "capped" in name else None
            local = (LocalCacheSettings(dir=str(workdir / f"local_{len(results['runs'])}"), epochs=args.epochs)
                     if "local cache" in name else None)
            results["runs"][name] = read_epochs(s3_url, plan, args, manifest_url, local, proxy)
    say("  local disk (again)")
    results["runs"]["local disk (again)"] = read_epochs(local_url, plan, args, manifest_url, None, None)
    return results


# ------------------------------------------------------------------------------------------------ report
def _reference(runs: dict[str, Any], field: str) -> tuple[float, list[float]]:
    """Mean of the local-disk runs' ``field`` (epochs 2..E) and the values averaged."""
    disk = [runs[k][field] for k in ("local disk", "local disk (again)") if k in runs]
    return sum(disk) / len(disk), disk


def render(results: dict[str, Any]) -> str:
    """Bytes per run against the needed bytes, step rates against the local-disk rate."""
    cfg, runs, mb = results["config"], results["runs"], 1e6
    needed = sum(results["needed"].values())
    wall, _ = _reference(runs, "later_steps_per_s")
    steady, _ = _reference(runs, "later_steady_steps_per_s")
    lines = [f"bench_local_cache: {cfg['images']} images x V = {cfg['views']} views at ViT-B/16 shapes "
             f"({results['bytes_per_view']:,} decoded B per view), E = {cfg['epochs']} epochs, batch {cfg['batch']}, "
             f"{cfg['workers']} loader worker(s); this machine ({os.cpu_count()} cores)",
             common.row("cache: stored data objects / needed by the run",
                        f"{results['stored_data_bytes'] / mb:.1f} / {needed / mb:.1f}", "MB"),
             "  run                     | store data GET MB (per epoch)      | ÷ needed | other MB | steps/s epoch 1 "
             "| epochs 2..E: steps/s (÷ disk) | after each epoch's 1st batch (÷ disk)"]
    for name, r in runs.items():
        per_epoch = " ".join(f"{e['get_data_bytes'] / mb:.0f}" for e in r["epochs"])
        ratio = f"{r['get_data_bytes'] / needed:8.3f}" if "S3" in name else "       -"
        lines.append(f"  {name:<23} | {r['get_data_bytes'] / mb:7.1f} ({per_epoch:<24}) | {ratio} | "
                     f"{r['get_other_bytes'] / mb:8.2f} | {r['epochs'][0]['steps_per_s']:15.2f} | "
                     f"{r['later_steps_per_s']:9.2f} ({r['later_steps_per_s'] / wall:.3f})"
                     f"{'':12} | {r['later_steady_steps_per_s']:9.2f} ({r['later_steady_steps_per_s'] / steady:.3f})")
    with_lc, without = runs.get("S3 + local cache"), runs.get("S3")
    if with_lc and without:
        lines.append(f"  object-store bytes / needed: {with_lc['get_data_bytes'] / needed:.3f} with the local cache "
                     f"(goal <= 1.1), {without['get_data_bytes'] / needed:.3f} without "
                     f"(E/V = {cfg['epochs'] / cfg['views']:.2f}); without / with = "
                     f"{without['get_data_bytes'] / with_lc['get_data_bytes']:.2f}")
    if capped := runs.get("S3 capped + local cache"):
        bare = runs.get("S3 capped")
        for label, field, ref in (("epochs 2..E", "later_steps_per_s", wall),
                                  ("after each epoch's first batch", "later_steady_steps_per_s", steady)):
            lines.append(f"  {cfg['bandwidth_mb']:g} MB/s link, step rate {label} / local disk: "
                         f"{capped[field] / ref:.3f} with the local cache"
                         + (f", {bare[field] / ref:.3f} without" if bare else "")
                         + f" (local disk {ref:.2f} steps/s, mean of its two runs)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_int_options(p, {
        "images": (512, "images in the synthetic cache"), "views": (2, "views per image V"),
        "epochs": (4, "epochs E of every run (E >= V: the run needs every chunk)"),
        "unit-size": (64, "images per unit (shard)"), "batch": (64, "samples per batch (one rank)"),
        "shuffle-window": (8, "blocks shuffled together"),
        "workers": (0, "loader workers per epoch (0: the reader runs in this process)"),
        "threads": (1, "torch threads of this process")})
    p.add_argument("--bandwidth-mb", type=float, default=20.0, help="the capped link's MB/s")
    common.add_output_args(p, "local_cache")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # s3fs sessions of finished readers, closed at exit
    raise SystemExit(common.bench_main(parse_args(), run, render))
