"""Benchmark of the train stage's target reader at ViT-B/16 shapes: decoded bytes and views per second per worker.

A synthetic target cache is written with ``TargetCache.write_unit`` at ViT-B/16 shapes (196 patches x 768 features,
``k_max`` from ``configs/base/imagenet.yaml``, 12 heads x 196 keys per attention row, the layout's default inner
chunking), filled with random float16 targets distributed like real ones (per-channel scales and offsets for the
features, per-row offsets for the logits; they compress like the measured real targets), once with the default
compressor and once with ``none``. Pixels come from Fashion-MNIST records (a real ``idx://`` manifest) built at
224 px, so their decode is cheap: an ImageNet JPEG costs more.

Measured per reader process, on the local cache (just written: page-cached), on a copy on a moto S3 server on
127.0.0.1 (spawned child process), and on that copy through ``train.local_cache`` (a node-local directory, filled by
one untimed pass first):

* ``read_samples``: ``TargetCache.read_samples(indices, views)`` of each batch, no block LRU (the store alone);
* ``targets``: ``_Reader._targets`` of each batch (what the train stage's reader does for the targets: held blocks
  plus one read of the missing whole blocks);
* ``batch``: ``_Reader.batch`` (targets + image read + pixel build), with the targets part timed inside it;
* ``loader tN`` / ``loader bN``: ``make_loader`` with N spawned workers, yielding the targets only (tN) or the
  whole batch (bN), timed from the first batch received (start-up excluded).

Before the timings, each store's ``read_samples`` (which decodes the shard chunks itself) is checked against zarr's
own reads, sample by sample (:func:`check_reads`). Rates: views/s of wall time, views per CPU-second of the reader
(all its threads; in the loader, the workers': what one worker with a core of its own would do), decoded target MB/s
delivered and fetched (whole blocks).
``others`` is the CPU load of other processes on the machine during the phase, in cores.

Run ``.venv/bin/python benchmarks/bench_reader.py --help``; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
import zarr
from numcodecs import Blosc
from torch.utils.data import IterableDataset

from infra import storage
from stages.cache import create_or_open, open_cache, raw_bytes_per_view
from stages.cache.local_tier import LocalCacheSettings
from stages.cache.spec import CacheSpec
from stages.train.data import SamplePlan, TrainBatches, _Reader, make_loader
from stages.views import Preprocess

try:  # as ``python -m benchmarks.bench_reader`` or as a script (then benchmarks/ is sys.path[0])
    from benchmarks import common
except ImportError:  # pragma: no cover
    import common  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
PATCHES, EMBED, HEADS, SIDE = 196, 768, 12, 224
GOALS = (1000, 2000)  # views/s per GPU


def k_max_of_config() -> int:
    """``extract.k_max`` of ``configs/base/imagenet.yaml``."""
    return int(yaml.safe_load((REPO / "configs/base/imagenet.yaml").read_text())["extract"]["k_max"])


# ------------------------------------------------------------------------------------------------ set-up
def make_spec(args: argparse.Namespace, manifest_url: str, k_max: int) -> CacheSpec:
    """A ViT-B/16-shaped spec over ``args.images`` grey 224 px views (Fashion-MNIST mean/std)."""
    pre = Preprocess.fashion_mnist(SIDE)
    return CacheSpec(
        checkpoint="file:///bench/base.pth", checkpoint_sha256="0" * 64,
        timm_kwargs={"img_size": SIDE, "patch_size": 16, "embed_dim": EMBED, "depth": 12, "num_heads": HEADS,
                     "in_chans": 1},
        k_max=k_max, output_size=SIDE, mean=pre.mean, std=pre.std, view_seed=0, views_per_image=args.views,
        manifest_uri=manifest_url, manifest_sha256="0" * 64, n_images=args.images, num_patches=PATCHES,
        embed_dim=EMBED, num_heads=HEADS, unit_size=args.unit_size)


def unit_targets(rng: np.random.Generator, rows: range, spec: CacheSpec, pre: Preprocess) -> dict[str, np.ndarray]:
    """Random targets of one unit: features ~ offset_c + scale_c·z (log-normal scales), logits ~ row offset + 1.5·z,
    top-k distinct patch indices, crop boxes planned for 28×28 sources. Shapes as ``TargetCache.write_unit``."""
    n, v, k = len(rows), spec.views_per_image, spec.k_max
    scale = np.exp(rng.normal(0.0, 0.5, EMBED)).astype(np.float32)
    offset = rng.normal(0.0, 0.5, EMBED).astype(np.float32)
    feats = (rng.standard_normal((n, v, PATCHES, EMBED), dtype=np.float32) * scale + offset).astype(np.float16)
    logits = rng.standard_normal((n, v, k + 1, HEADS, PATCHES), dtype=np.float32) * 1.5
    logits += rng.normal(0.0, 2.0, (n, v, k + 1, 1, 1)).astype(np.float32)
    topk = np.argsort(rng.random((n, v, PATCHES)), axis=-1)[..., :k]
    boxes = np.array([[pre.plan(spec.view_seed, i, j, 28, 28) for j in range(v)] for i in rows])
    return {"features": feats, "attn_logits": logits.astype(np.float16), "topk_index": topk, "views": boxes,
            "valid": np.ones(n, bool)}


def write_cache(url: str, spec: CacheSpec, compressor: str, seed: int = 0) -> dict[str, Any]:
    """Write every unit of ``spec`` at ``url``; returns seconds and stored/raw bytes."""
    cache, pre = create_or_open(url, spec, compressor=compressor), Preprocess.fashion_mnist(SIDE)
    rng = np.random.default_rng(seed)
    record: dict[str, Any] = {"compressor": compressor}
    with common.timed_phase(record):
        for unit in range(cache.n_units):
            cache.write_unit(unit, **unit_targets(rng, cache.unit_range(unit), spec, pre))
    summary = cache.summary()
    record.update(stored_over_raw=1 / summary.compression_ratio, stored_mb=summary.stored_bytes / 1e6)
    return record


def codec_floor(seconds: float = 1.0) -> dict[str, float]:
    """One core's floor, out of the CPU caches: Blosc zstd-3 byte-shuffle decode of 8 distinct features inner chunks
    (16 images each, as the layout makes them) into fresh buffers, and a copy of a 64 MB array, in MB per CPU-s."""
    rng = np.random.default_rng(1)
    codec = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE, blocksize=1 << 18)
    chunks = [(rng.standard_normal((16, PATCHES, EMBED), dtype=np.float32) * 2).astype(np.float16) for _ in range(8)]
    encoded = [codec.encode(c) for c in chunks]
    big = np.concatenate(chunks * 2)

    def rate(fn: Callable[[], object], nbytes: int) -> float:
        n, t0 = 0, time.process_time()
        while time.process_time() - t0 < seconds:
            fn()
            n += 1
        return n * nbytes / (time.process_time() - t0) / 1e6

    return {"blosc_zstd_decode_mb_per_cpu_s": rate(lambda: [codec.decode(e) for e in encoded],
                                                   sum(c.nbytes for c in chunks)),
            "memcpy_mb_per_cpu_s": rate(big.copy, big.nbytes)}


# ------------------------------------------------------------------------------------------------ measurements
class _Window:
    """Views, bytes and CPU of a timed window (the reader's process CPU, or given CPU cores)."""

    def __init__(self, per_view: int) -> None:
        self.per_view, self.views, self.fetched = per_view, 0, 0
        self.cpu = common.ProcessCpu({"earlier children": common.child_pids()})  # e.g. the moto server
        self.cpu.start()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def add(self, views: int, fetched: int = 0) -> None:
        self.views += views
        self.fetched += fetched

    def result(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        load = self.cpu.stop()
        cpu_s = time.process_time() - self.c0
        self.main_cores = cpu_s / wall
        return {"views": self.views, "seconds": wall, "views_per_s": self.views / wall,
                "views_per_cpu_s": self.views / cpu_s if cpu_s else math.nan,
                "mb_per_s": self.views * self.per_view / wall / 1e6, "fetched_mb_per_s": self.fetched / wall / 1e6,
                "cores": cpu_s / wall, "others": load.get("others", math.nan)}


def steps_of(plan: SamplePlan, epochs: int) -> Iterator[tuple[int, int]]:
    """(epoch, step) pairs of ``epochs`` epochs."""
    for epoch in range(epochs):
        for step in range(plan.steps_per_epoch()):
            yield epoch, step


def _timed(fn: Callable[..., Any], acc: dict[str, float]) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc["seconds"] += time.perf_counter() - t0
    return wrapper


def in_process(kind: str, dataset: Callable[[int], TrainBatches], plan: SamplePlan, epochs: int,
               per_view: int) -> dict[str, float]:
    """``read_samples`` / ``targets`` / ``batch`` rates in this process over ``epochs`` epochs (readers, i.e.
    manifest and store handles, opened before the window); ``batch`` also reports the share of its targets part."""
    readers = {e: _Reader(dataset(e)) for e in range(epochs)}
    inner = {"seconds": 0.0}
    if kind == "batch":
        for reader in readers.values():
            reader._targets = _timed(reader._targets, inner)  # type: ignore[method-assign]
    window = _Window(per_view)
    for epoch, step in steps_of(plan, epochs):
        reader = readers[epoch]
        idx, views = plan.rank_batch(epoch, step, 0)
        if kind == "read_samples":
            reader.cache.read_samples(idx, views=views, check_complete=False)
            window.add(idx.size, idx.size * per_view)
        elif kind == "targets":
            window.add(idx.size, reader._targets(idx)[1])
        else:
            window.add(idx.size, reader.batch(step)["bytes_fetched"])
    result = window.result()
    if kind == "batch":
        result["targets_share"] = inner["seconds"] / result["seconds"]
    return result


def _stamp() -> dict[str, float]:
    """Which loader worker made a batch and its CPU seconds so far (the main process cannot see a worker's CPU
    after it exits)."""
    info = torch.utils.data.get_worker_info()
    return {"worker": info.id if info is not None else 0, "cpu": time.process_time()}


class _TargetsOnly(IterableDataset):
    """The targets (``_Reader._targets``) of a :class:`TrainBatches` spanning epochs, no pixels, as tensors: one
    reader per worker for all the epochs, as the train stage's loader keeps it."""

    def __init__(self, dataset: TrainBatches) -> None:
        super().__init__()
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        ds, per_epoch = self.dataset, self.dataset.plan.steps_per_epoch()
        reader = _Reader(ds)
        for g in range(ds.first + worker, ds.until, n_workers):
            epoch, step = divmod(g, per_epoch)
            reader.set_epoch(epoch)
            idx = ds.plan.rank_batch(epoch, step, 0)[0]
            targets, fetched = reader._targets(idx)
            yield {"features": torch.from_numpy(targets["features"]),
                   "attn_logits": torch.from_numpy(targets["attn_logits"]),
                   "topk_index": torch.from_numpy(targets["topk_index"].astype(np.int64)),
                   "n": idx.size, "bytes_fetched": fetched, **_stamp()}


class _Stamped(IterableDataset):
    """Whole batches of a :class:`TrainBatches` spanning epochs (the train stage's loader), stamped."""

    def __init__(self, dataset: TrainBatches) -> None:
        super().__init__()
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.dataset:
            yield {**batch, "n": batch["indices"].numel(), **_stamp()}


def with_loader(dataset: IterableDataset, workers: int, per_view: int) -> dict[str, float]:
    """Rates of ``make_loader(dataset, workers)``: wall from the first batch received to the last, worker CPU from
    each worker's first batch to its last (start-up excluded); views and bytes of the batches after those firsts."""
    it = iter(make_loader(dataset, num_workers=workers, prefetch=2))
    first = next(it)
    window = _Window(per_view)
    cpu = {int(first["worker"]): [float(first["cpu"])] * 2}
    for batch in it:
        w = int(batch["worker"])
        if w not in cpu:
            cpu[w] = [float(batch["cpu"])] * 2
            continue
        cpu[w][1] = float(batch["cpu"])
        window.add(int(batch["n"]), int(batch["bytes_fetched"]))
    out = window.result()
    worker_cpu = sum(b - a for a, b in cpu.values())
    # the workers have exited when the window closes: ProcessCpu counted them in "others"
    out.update(views_per_cpu_s=window.views / worker_cpu if worker_cpu else math.nan,
               cores=worker_cpu / out["seconds"], others=out["others"] - worker_cpu / out["seconds"],
               main_cores=window.main_cores, per_worker_views_per_s=out["views_per_s"] / workers)
    return out


def check_reads(url: str, plan: SamplePlan) -> int:
    """The train reader's targets of the first batch of two epochs equal zarr's own reads, sample by sample
    (``read_samples`` decodes shard chunks itself); returns the samples compared. Raises AssertionError."""
    plain = zarr.open_group(storage.zarr_store(url), mode="r", zarr_format=3)
    cache, compared = open_cache(url), 0
    for epoch in range(min(2, plan.views_per_image)):
        idx, views = plan.rank_batch(epoch, 0, 0)
        got = cache.read_samples(idx, views=views, check_complete=False)
        for name in ("features", "attn_logits", "topk_index", "views"):
            want = np.stack([plain[name][i, v] for i, v in zip(idx.tolist(), views.tolist(), strict=True)])
            assert np.array_equal(getattr(got, name), want), f"{url}: {name} of read_samples differs from zarr"
        compared += idx.size
    return compared


def measure_store(url: str, label: str, args: argparse.Namespace, manifest_url: str, say: Callable[[str], None],
                  local: LocalCacheSettings | None = None) -> dict[str, dict[str, float]]:
    """Every measurement of one cache URL (after checking its reads, :func:`check_reads`); with ``local``, through
    the node-local cache, filled first by one untimed pass (every object fetched whole: all its views)."""
    cache = open_cache(url)
    per_view = raw_bytes_per_view(cache.spec)
    plan = SamplePlan(cache.valid(), block_size=cache.block_size, views_per_image=cache.spec.views_per_image,
                      seed=0, global_batch=args.batch, world_size=1, shuffle_window=args.shuffle_window)
    say(f"  {label}: read_samples equals zarr's reads ({check_reads(url, plan)} samples)")
    pre = Preprocess.fashion_mnist(SIDE)

    def dataset(epoch: int, until: int | None = None) -> TrainBatches:
        return TrainBatches(plan, epoch, 0, 0, manifest_url=manifest_url, preprocess=pre, in_chans=1,
                            cache_url=url, checked_spec=cache.spec, local_cache=local, until=until)

    if local is not None:
        say(f"  {label}: filling the local cache")
        warm = _Reader(dataset(0))
        for step in range(plan.steps_per_epoch()):
            warm._targets(plan.rank_batch(0, step, 0)[0])
    out: dict[str, dict[str, float]] = {}
    for kind in args.kinds.split(","):
        say(f"  {label}: {kind}")
        if kind in ("read_samples", "targets", "batch"):
            out[kind] = in_process(kind, dataset, plan, args.epochs, per_view)
        else:
            workers = int(kind[1:])
            spanning = dataset(0, until=args.loader_epochs * plan.steps_per_epoch())
            data = _TargetsOnly(spanning) if kind[0] == "t" else _Stamped(spanning)
            out[f"loader {kind}"] = with_loader(data, workers, per_view)
    return out


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """Write the caches, copy the default one to moto S3, measure every store."""
    workdir = args.workdir
    manifest_url = common.fresh_manifest(workdir, args.idx, args.images)
    spec = make_spec(args, manifest_url, k_max_of_config())
    results: dict[str, Any] = {"config": common.config_of(args), "bytes_per_view": raw_bytes_per_view(spec),
                               "floor": codec_floor(), "caches": {}, "stores": {}}
    for compressor in args.compressors.split(","):
        url = str(workdir / f"cache_{compressor}")
        say(f"writing the {compressor} cache ({args.images} images x {args.views} views)")
        results["caches"][compressor] = write_cache(url, dataclasses.replace(spec, manifest_uri=manifest_url),
                                                    compressor)
        results["stores"][f"local {compressor}"] = measure_store(url, f"local {compressor}", args, manifest_url, say)
    if args.s3:
        with common.moto_server() as endpoint:
            s3_url = common.create_bucket(endpoint)
            first = args.compressors.split(",")[0]
            say(f"copying the {first} cache to moto S3")
            results["s3_copy"] = common.copy_to_s3(str(workdir / f"cache_{first}"), s3_url)
            results["stores"][f"S3 {first}"] = measure_store(s3_url, f"S3 {first}", args, manifest_url, say)
            local = LocalCacheSettings(dir=str(workdir / "local_cache"), epochs=max(args.epochs, args.views))
            results["stores"][f"S3 {first} + local cache"] = measure_store(
                s3_url, f"S3 {first} + local cache", args, manifest_url, say, local)
    return results


# ------------------------------------------------------------------------------------------------ report
def workers_needed(rate: float) -> str:
    """Loader workers for each goal (views/s per GPU) at ``rate`` views/s per worker."""
    if not rate or math.isnan(rate):
        return "-"
    return ", ".join(f"{g}/s: {math.ceil(g / rate)}" for g in GOALS)


def render(results: dict[str, Any]) -> str:
    """The results table: one row per store and measurement, then workers needed per goal."""
    floor, per_view = results["floor"], results["bytes_per_view"]
    lines = [f"bench_reader: ViT-B/16 targets, {per_view} decoded bytes per view, batch "
             f"{results['config']['batch']}; this machine ({os.cpu_count()} cores)",
             common.row("one core: Blosc zstd-3 decode / memcpy",
                        f"{floor['blosc_zstd_decode_mb_per_cpu_s']:.0f} / {floor['memcpy_mb_per_cpu_s']:.0f}",
                        "MB per CPU-second")]
    for name, rec in results["caches"].items():
        lines.append(common.row(f"cache {name}: stored/raw, write s", f"{rec['stored_over_raw']:.3f}",
                                f"{rec['seconds']:.1f} s"))
    lines.append(common.row("store / measurement", "views/s", "views/CPU-s  MB/s dec (fetched)  cores  others"))
    for store, by_kind in results["stores"].items():
        for kind, r in by_kind.items():
            lines.append(common.row(f"{store}: {kind}", f"{r['views_per_s']:.0f}",
                                    f"{r['views_per_cpu_s']:10.0f}  {r['mb_per_s']:6.0f} ({r['fetched_mb_per_s']:.0f})"
                                    f"  {r['cores']:5.2f}  {r['others']:5.2f}"
                                    + (f"  targets {r['targets_share']:.0%} of it" if "targets_share" in r else "")))
    lines.append("  loader workers needed per GPU (from views per CPU-second of one worker, a core each):")
    for store, by_kind in results["stores"].items():
        for kind in ("targets", "loader t1", "batch", "loader b1"):
            if kind in by_kind:
                lines.append(common.row(f"{store}: {kind}", workers_needed(by_kind[kind]["views_per_cpu_s"])))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_int_options(p, {
        "images": (1024, "images in the synthetic cache"), "views": (2, "views per image V"),
        "unit-size": (64, "images per unit (shard)"), "batch": (64, "samples per batch (one rank)"),
        "shuffle-window": (8, "blocks shuffled together"), "epochs": (2, "epochs per in-process measurement"),
        "loader-epochs": (2, "epochs per DataLoader measurement"), "threads": (1, "torch threads of this process")})
    p.add_argument("--compressors", default="shuffle,none", help="caches to write; the first is copied to S3")
    p.add_argument("--kinds", default="read_samples,targets,batch,t1,t2,b1,b2",
                   help="measurements: read_samples, targets, batch, tN (loader, targets), bN (loader, batches)")
    p.add_argument("--no-s3", dest="s3", action="store_false", help="skip the moto S3 store")
    common.add_output_args(p, "reader")
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(common.bench_main(parse_args(), run, render))
