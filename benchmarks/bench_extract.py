"""Benchmark of the extract stage and the target cache, all ratios measured side by side in one run.

What it measures, on this machine, with real Fashion-MNIST images and a randomly initialised timm ViT saved in MAE
format (random weights change no throughput; they do change the *values*, see the README on compression):

(a) bare forward: views/s of ``BaseModel`` on pre-built pixel batches (same batch size, float32 on CPU, the same
    torch thread count an actor gets), timed in the driver right before the matching extraction run;
(b) extraction: ``run_extract`` with 1 actor x T threads into a local cache, views/s over ``work_seconds`` (from
    the moment the actors are ready to the last unit), and (b)/(a) (goal >= 0.9);
(c) 1 actor x 2T threads vs 2 actors x T threads (same total threads), each against the bare forward at 2T;
(d) bytes per view: raw (float16 targets + int16/int32 side arrays) vs stored, for the cache's default codec and
    for every other lossless codec, rewriting the same real targets into scratch caches (goal stored/raw <= 0.85);
(e) reads with a training-like access pattern: a random permutation of the images per epoch, view
    ``(epoch + index) mod V`` per image, in batches through ``TargetCache.read_samples``, from the local cache
    and from a copy on a moto S3 server on 127.0.0.1 (run in a spawned child process so it does not share the
    reader's GIL).

It also profiles where extraction time goes (per-unit markers: load = image read + view build, forward, write; and a
driver-side micro-profile of image read, view planning and view building) and reports the machine's busy cores
during every timed phase (another user's load shows up there).

Run ``.venv/bin/python benchmarks/bench_extract.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.ray_cluster import ensure_ray
from stages.cache import COMPRESSORS, SHARDED, TargetCache, create_or_open, open_cache, raw_bytes_per_view
from stages.extract import ExtractJob, ExtractResult, run_extract
from stages.images import ImageSource, load_idx_images
from stages.views import Preprocess
from tec_model import BaseModel, num_patches, vit_kwargs
from tec_model.flops import vit_forward_macs

try:  # as ``python -m benchmarks.bench_extract`` or as a script (then benchmarks/ is sys.path[0])
    from benchmarks import common
except ImportError:  # pragma: no cover
    import common  # type: ignore[no-redef]

log = logging.getLogger("bench_extract")

GOAL_EXTRACT_RATIO = 0.9
GOAL_STORED_RAW = 0.85
READ_PATTERNS = ("random", "unit-window")


# ------------------------------------------------------------------------------------------------ setup
@dataclass(frozen=True)
class Setup:
    """Inputs shared by every measurement."""

    workdir: Path
    manifest_url: str
    checkpoint_url: str
    timm_kwargs: dict[str, Any]
    preprocess: Preprocess


def make_setup(args: argparse.Namespace) -> Setup:
    """Write the manifest (first ``--images`` Fashion-MNIST records) and a random MAE-format checkpoint."""
    kwargs = vit_kwargs(args.arch, in_chans=1, img_size=args.img_size)
    manifest_url, checkpoint_url = common.write_manifest_and_checkpoint(args.workdir, args.idx, args.images, kwargs)
    return Setup(args.workdir, manifest_url, checkpoint_url, kwargs, Preprocess.fashion_mnist(args.img_size, 1))


def make_job(setup: Setup, args: argparse.Namespace, cache_url: str, compressor: str = "shuffle") -> ExtractJob:
    return ExtractJob(cache_url=cache_url, manifest_url=setup.manifest_url, checkpoint_url=setup.checkpoint_url,
                      timm_kwargs=setup.timm_kwargs, preprocess=setup.preprocess, views_per_image=args.views,
                      k_max=args.k_max, unit_size=args.unit_size, batch_size=args.batch_size, compressor=compressor)


def real_pixel_batches(setup: Setup, args: argparse.Namespace, n_batches: int = 2) -> list[torch.Tensor]:
    """Views of real images built with the extract stage's own functions, as (batch, 1, S, S) float32 batches."""
    source = ImageSource(in_chans=1)
    uris = [f"idx://{args.idx.resolve()}#{i}" for i in range(args.images)]
    views = []
    for k in range(n_batches * args.batch_size):
        index, view = (k // args.views) % len(uris), k % args.views
        image = source.read(uris[index])
        box = setup.preprocess.plan(0, index, view, *image.shape[:2])
        views.append(setup.preprocess.build(image, box))
    pixels = torch.stack(views)
    return list(pixels.split(args.batch_size))


# ------------------------------------------------------------------------------------------------ (a) (b) (c)
def bare_forward(setup: Setup, args: argparse.Namespace, batches: list[torch.Tensor], threads: int) -> dict:
    """Views/s of the bare batched base-model forward at ``threads`` torch threads (after one warm-up batch)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = BaseModel(setup.timm_kwargs, last_layers=2, k_max=args.k_max)
    try:
        model(batches[0])
        record: dict[str, Any] = {"threads": threads, "batch_size": args.batch_size, "dtype": "float32"}
        views = 0
        with common.timed_phase(record):
            start = time.perf_counter()
            while time.perf_counter() - start < args.forward_seconds or views < 2 * args.batch_size:
                for batch in batches:
                    model(batch)
                    views += len(batch)
        record["views"] = views
        record["views_per_s"] = views / record["seconds"]
        return record
    finally:
        torch.set_num_threads(previous)


def extraction(setup: Setup, args: argparse.Namespace, actors: int, threads: int, in_flight: int) -> dict:
    """One ``run_extract`` into a fresh local cache; views/s over ``work_seconds`` plus the per-step breakdown.

    With ``in_flight`` > 1 an actor (``max_concurrency=in_flight``) runs that many units at once, forwards
    included, so a "T-thread" actor can keep up to ``in_flight x T`` cores busy; ``in_flight=1`` is the run that
    really uses T cores.
    """
    cache_url = str(setup.workdir / f"cache_{actors}x{threads}_f{in_flight}")
    job = make_job(setup, args, cache_url)
    record: dict[str, Any] = {"actors": actors, "threads_per_actor": threads, "in_flight_per_actor": in_flight,
                              "cache_url": cache_url}
    meter = common.CpuMeter()
    meter.start()
    result: ExtractResult = run_extract(job, num_actors=actors, threads_per_actor=threads,
                                        in_flight_per_actor=in_flight)
    record["busy_cores_whole_call"] = meter.stop()
    record.update(views=result.views_written, work_seconds=result.work_seconds, wall_seconds=result.wall_seconds,
                  views_per_s=result.views_written / result.work_seconds,
                  views_per_s_wall=result.views_written / result.wall_seconds)
    breakdown = common.unit_breakdown(open_cache(cache_url), args.views)
    breakdown["concurrency"] = breakdown.pop("unit_busy_s") / (result.work_seconds * actors)
    record["breakdown"] = breakdown
    return record


def micro_profile(setup: Setup, args: argparse.Namespace) -> dict:
    """Driver-side ms/view of the CPU steps before the forward: IDX load (once/process), read, plan, build."""
    t0 = time.perf_counter()
    load_idx_images.cache_clear()
    load_idx_images(str(args.idx.resolve()))
    idx_load_s = time.perf_counter() - t0
    source = ImageSource(in_chans=1)
    n = min(args.images, args.unit_size)
    uris = [f"idx://{args.idx.resolve()}#{i}" for i in range(n)]
    t0 = time.perf_counter()
    images = [source.read(u) for u in uris]
    t1 = time.perf_counter()
    boxes = [[setup.preprocess.plan(0, i, v, *images[i].shape[:2]) for v in range(args.views)] for i in range(n)]
    t2 = time.perf_counter()
    pixels = [setup.preprocess.build(images[i], boxes[i][v]) for i in range(n) for v in range(args.views)]
    torch.stack(pixels)
    t3 = time.perf_counter()
    views = n * args.views
    return {"idx_file_load_s_once_per_process": idx_load_s, "read_ms_per_view": 1e3 * (t1 - t0) / views,
            "plan_ms_per_view": 1e3 * (t2 - t1) / views, "build_ms_per_view": 1e3 * (t3 - t2) / views}


# ------------------------------------------------------------------------------------------------ (d)
def codec_sizes(setup: Setup, args: argparse.Namespace, source_url: str) -> dict:
    """Rewrite the source cache's real targets with every lossless codec; stored/raw, encode time, round trip."""
    source = open_cache(source_url)
    units = source.complete_units()
    batches = [source.read_unit(u) for u in units]
    out: dict[str, Any] = {}
    b = batches[0]  # warm-up: the first write in a process pays zarr/codec start-up costs
    warm = create_or_open(str(setup.workdir / "codec_warmup"), source.spec)
    warm.write_unit(units[0], b.features, b.attn_logits, b.topk_index, b.views, b.valid)
    for name in COMPRESSORS:
        url = str(setup.workdir / f"codec_{name}")
        cache = create_or_open(url, source.spec, compressor=name)
        t0 = time.perf_counter()
        for unit, b in zip(units, batches, strict=True):
            cache.write_unit(unit, b.features, b.attn_logits, b.topk_index, b.views, b.valid)
        write_s = time.perf_counter() - t0
        back = cache.read_unit(units[0])
        lossless = all(np.array_equal(getattr(back, f), getattr(batches[0], f))
                       for f in ("features", "attn_logits", "topk_index", "views", "valid"))
        s = cache.summary()
        per_array: dict[str, float] = {}
        raw_per_array: dict[str, int] = {}
        for unit in units:
            for key, size in cache.marker(unit)["stored_bytes"].items():
                array = key.split("/", 1)[0]
                per_array[array] = per_array.get(array, 0) + size
        for array in SHARDED:
            raw_per_array[array] = sum(getattr(b, array).nbytes for b in batches)
        out[name] = {
            "raw_bytes_per_view": s.raw_bytes_per_view, "stored_bytes_per_view": s.stored_bytes_per_view,
            "stored_over_raw": 1.0 / s.compression_ratio if s.compression_ratio else float("nan"),
            "stored_over_raw_by_array": {a: per_array[a] / raw_per_array[a] for a in SHARDED},
            "write_mb_per_s": s.raw_bytes / 1e6 / write_s, "lossless_round_trip": lossless,
        }
    return out


# ------------------------------------------------------------------------------------------------ (e)
def fetched_bytes_estimate(cache: TargetCache, batches: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """Bytes the reads fetch: whole inner chunks of the sharded arrays, whole unit chunks of the small ones.

    Estimated from each unit's stored object sizes (a shard's bytes split evenly over its inner chunks).
    """
    shapes = {name: cache._arrays[name] for name in ("features", "attn_logits", "topk_index", "views", "valid")}
    sizes = {u: cache.marker(u)["stored_bytes"] for u in cache.complete_units()}
    total = 0
    for idx, vid in batches:
        units = idx // cache.unit_size
        for name, arr in shapes.items():
            key_of = {u: next(k for k in sizes[u] if k.startswith(f"{name}/")) for u in np.unique(units)}
            if name in SHARDED:
                inner = arr.chunks[0]
                per_chunk = {u: sizes[u][key_of[u]] / (cache.spec.views_per_image * -(-cache.unit_size // inner))
                             for u in key_of}
                touched = {(int(i) // cache.unit_size, int(v), (int(i) % cache.unit_size) // inner)
                           for i, v in zip(idx, vid, strict=True)}
                total += int(sum(per_chunk[u] for u, _, _ in touched))
            else:
                total += sum(sizes[u][key_of[u]] for u in key_of)
    return total


def read_plan(cache: TargetCache, args: argparse.Namespace, pattern: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (indices, views) of every ``read_samples`` call; view ``(epoch + index) mod V`` throughout.

    ``random``: per epoch a random permutation of all images, ``--read-batch`` images per call.
    ``unit-window``: per epoch a random order of the units; each call reads ``--read-window`` whole units, their
    images shuffled (a shuffle buffer of that many units; training batches are then cut from it).
    """
    n, v = cache.spec.n_images, cache.spec.views_per_image
    rng = np.random.default_rng(0)
    plan = []
    for epoch in range(args.read_epochs):
        if pattern == "random":
            order = rng.permutation(n)
            calls = [order[s : s + args.read_batch] for s in range(0, n, args.read_batch)]
        else:
            units = rng.permutation(cache.n_units)
            calls = [rng.permutation(np.concatenate([np.asarray(cache.unit_range(int(k))) for k in
                                                     units[s : s + args.read_window]]))
                     for s in range(0, len(units), args.read_window)]
        plan += [(idx, (epoch + idx) % v) for idx in calls]
    return plan


def read_pattern(cache_url: str, args: argparse.Namespace, label: str, pattern: str) -> dict:
    """Time the reads of :func:`read_plan` through ``TargetCache.read_samples``; delivered and fetched MB/s."""
    cache = open_cache(cache_url)
    plan = read_plan(cache, args, pattern)
    per_view = raw_bytes_per_view(cache.spec)
    record: dict[str, Any] = {"store": label, "pattern": pattern, "url": cache_url, "calls": len(plan),
                              "images_per_call": float(np.mean([len(i) for i, _ in plan])),
                              "epochs": args.read_epochs}
    views = 0
    with common.timed_phase(record):
        for idx, vid in plan:
            got = cache.read_samples(idx, views=vid)
            views += len(got.indices)
    fetched = fetched_bytes_estimate(cache, plan)
    record.update(views=views, views_per_s=views / record["seconds"],
                  delivered_mb_per_s=views * per_view / 1e6 / record["seconds"],
                  fetched_mb_per_s_est=fetched / 1e6 / record["seconds"],
                  read_amplification_est=fetched / (views * per_view / (cache.summary().compression_ratio or 1)))
    return record


def s3_reads(local_url: str, args: argparse.Namespace) -> list[dict]:
    """Copy the cache to a bucket on a loopback moto server and run the read pattern there."""
    with common.moto_server() as endpoint:
        s3_url = common.create_bucket(endpoint)
        upload = common.copy_to_s3(local_url, s3_url)
        records = [read_pattern(s3_url, args, "s3 (moto, 127.0.0.1)", p) for p in READ_PATTERNS]
        records[0]["upload"] = upload
        records[0]["endpoint"] = endpoint
    # zarr's FsspecStore keeps an aiohttp session open until exit; asyncio would log it as an error then
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    return records


# ------------------------------------------------------------------------------------------------ report
_row = common.row


def render(results: dict) -> str:
    """The results table printed at the end of a run."""
    cfg, lines = results["config"], []
    lines.append(f"Extraction benchmark — {cfg['arch']} in_chans=1 img {cfg['img_size']} (L={cfg['num_patches']}, "
                 f"C={cfg['embed_dim']}, H={cfg['num_heads']}, {cfg['gmacs_per_view']:.2f} GMAC/view), float32 CPU, "
                 f"batch {cfg['batch_size']}, unit {cfg['unit_size']}, V={cfg['views']}, k_max {cfg['k_max']}, "
                 f"{cfg['images']} Fashion-MNIST images = {cfg['images'] * cfg['views']} views, "
                 f"{cfg['cpu_count']} cores")
    lines.append("  (busy = machine-wide busy cores during the timed phase; > the phase's threads means other load)")
    lines.append("Throughput (views/s)")
    shown = None
    for key, ext in results["extract"].items():
        bare = results["bare"][str(ext["bare_threads"])]
        if bare["threads"] != shown:
            shown = bare["threads"]
            runs = " / ".join(f"{r['views_per_s']:.1f}" for r in bare["runs"])
            lines.append(_row(f"(a) bare forward, {bare['threads']} thread(s)", f"{bare['views_per_s']:.1f}",
                              f"mean of {runs} (before / after); own cores {bare['own_cores']:.2f}, machine busy "
                              f"{bare['busy_cores']:.2f}"))
        goal = f" (goal >= {GOAL_EXTRACT_RATIO})" if key == results["like_for_like"] else ""
        lines.append(_row(f"    run_extract {key}", f"{ext['views_per_s']:.1f}",
                          f"= {ext['views_per_s'] / bare['views_per_s']:.2f}x bare{goal}; busy "
                          f"{ext['busy_cores_whole_call']:.2f}; incl. Ray start/model load "
                          f"{ext['views_per_s_wall']:.1f}"))
    for name, value in results["ratios"].items():
        lines.append(_row(name, f"{value:.2f}x"))
    lines.append("Where extraction time goes (ms/view, summed over units; concurrency = busy unit-seconds / "
                 "(work s x actors))")
    for key, ext in results["extract"].items():
        b = ext["breakdown"]
        lines.append(_row(f"{key}", f"load {b['load_ms_per_view']:.2f}",
                          f"forward {b['forward_ms_per_view']:.2f}  write {b['write_ms_per_view']:.2f}  "
                          f"concurrency {b['concurrency']:.2f}"))
    p = results["profile"]
    lines.append(_row("driver micro-profile of load", f"read {p['read_ms_per_view']:.3f}",
                      f"plan {p['plan_ms_per_view']:.3f}  build {p['build_ms_per_view']:.3f} ms/view; IDX file "
                      f"load {p['idx_file_load_s_once_per_process']:.2f} s once per actor"))
    lines.append(f"Bytes per view (raw {results['codecs']['shuffle']['raw_bytes_per_view']} B: float16 features + "
                 f"attn_logits, int16 topk, int32 views; goal stored/raw <= {GOAL_STORED_RAW}, lossless)")
    for name, c in results["codecs"].items():
        by = ", ".join(f"{a} {r:.3f}" for a, r in c["stored_over_raw_by_array"].items())
        default = " (default)" if name == results["config"]["compressor"] else ""
        lines.append(_row(f"{name}{default}", f"{c['stored_bytes_per_view']:.0f} B",
                          f"stored/raw {c['stored_over_raw']:.3f} ({by}); write_unit {c['write_mb_per_s']:.0f} MB/s; "
                          f"lossless {c['lossless_round_trip']}"))
    lines.append(f"Training-like reads (view (epoch+i) mod V, {cfg['read_epochs']} epochs; random = a permutation of "
                 f"all images, {cfg['read_batch']} per call; unit-window = shuffled units, {cfg['read_window']} whole "
                 f"units per call; delivered = decoded bytes handed to training, fetched = est. stored bytes read)")
    for r in results["reads"]:
        lines.append(_row(f"{r['store']}, {r['pattern']}", f"{r['views_per_s']:.0f} views/s",
                          f"{r['delivered_mb_per_s']:.1f} MB/s delivered, ~{r['fetched_mb_per_s_est']:.1f} MB/s "
                          f"fetched (amplification ~{r['read_amplification_est']:.1f}x); feeds "
                          f"{r['feeds_forward_rate']:.1f}x the bare forward rate; busy {r['busy_cores']:.2f}"))
        if "upload" in r:
            u = r["upload"]
            lines.append(_row("  upload of the cache to moto", f"{u['mb_per_s']:.1f} MB/s",
                              f"{u['objects']} objects, {u['mb']:.1f} MB"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=384, help="Fashion-MNIST images (first N of the train set)")
    p.add_argument("--arch", default="vit_small_patch16_224", help="base-model size (tec_model.archs.ARCHS)")
    p.add_argument("--img-size", type=int, default=112, help="view side S = the base model's img_size")
    p.add_argument("--batch-size", type=int, default=64, help="views per base-model forward")
    p.add_argument("--unit-size", type=int, default=64, help="images per work unit (= per shard)")
    p.add_argument("--views", type=int, default=2, help="views per image V")
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor T (and of the bare forward)")
    p.add_argument("--k-max", type=int, default=15, help="attention rows kept besides cls")
    p.add_argument("--in-flight", type=int, default=2, help="run_extract's in_flight_per_actor")
    p.add_argument("--forward-seconds", type=float, default=8.0, help="minimum timing window of a bare forward")
    p.add_argument("--read-batch", type=int, default=64, help="images per read_samples call")
    p.add_argument("--read-epochs", type=int, default=2, help="epochs of the read pattern")
    p.add_argument("--read-window", type=int, default=2, help="units per read_samples call (unit-window pattern)")
    p.add_argument("--skip-s3", action="store_true", help="skip the moto S3 read measurement")
    common.add_output_args(p, "extract")
    return p.parse_args(argv)


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    """Every measurement, in the order that keeps each ratio's two sides adjacent in time."""
    setup = make_setup(args)
    cpus = os.cpu_count() or 1
    kw = setup.timm_kwargs
    results: dict[str, Any] = {
        "config": {**common.config_of(args),
                   "num_patches": num_patches(kw), "embed_dim": kw["embed_dim"], "num_heads": kw["num_heads"],
                   "gmacs_per_view": vit_forward_macs(kw) / 1e9, "cpu_count": cpus, "compressor": "shuffle",
                   "torch": torch.__version__, "timm_kwargs": kw,
                   "checkpoint": common.RANDOM_CHECKPOINT},
        "bare": {}, "extract": {}, "ratios": {},
    }
    ensure_ray(None)  # started once, before any timing, so both sides of a ratio see the same background
    batches = real_pixel_batches(setup, args)
    t = args.threads
    plan = [(1, t, t)]
    if args.in_flight != 1:
        plan.append((1, t, t))  # again with in_flight_per_actor=1 (see extraction())
    if 2 * t <= cpus:
        plan += [(1, 2 * t, 2 * t), (2, t, 2 * t)]
    else:
        say(f"note: (c) needs 2x{t} threads but the machine has {cpus} cores; skipped")
    runs: dict[str, list[dict]] = {}
    for k, (actors, threads, bare_threads) in enumerate(plan):
        if str(bare_threads) not in runs:
            say(f"(a) bare forward at {bare_threads} thread(s) ...")
            runs[str(bare_threads)] = [bare_forward(setup, args, batches, bare_threads)]
        in_flight = 1 if k == 1 and args.in_flight != 1 else args.in_flight
        key = f"{actors} actor(s) x {threads} thread(s), in_flight {in_flight}"
        say(f"(b/c) run_extract {key} ...")
        results["extract"][key] = {**extraction(setup, args, actors, threads, in_flight), "bare_threads": bare_threads}
        if k + 1 == len(plan) or plan[k + 1][2] != bare_threads:  # the bare forward again after its last pairing
            say(f"(a) bare forward at {bare_threads} thread(s), again ...")
            runs[str(bare_threads)].append(bare_forward(setup, args, batches, bare_threads))
    for threads_key, measured in runs.items():  # each ratio uses the mean of the runs before and after
        rates = [m["views_per_s"] for m in measured]
        results["bare"][threads_key] = {
            "threads": int(threads_key), "views_per_s": float(np.mean(rates)), "runs": measured,
            "busy_cores": float(np.mean([m["busy_cores"] for m in measured])),
            "own_cores": float(np.mean([m["own_cores"] for m in measured])),
        }
    primary = f"1 actor(s) x {t} thread(s), in_flight {args.in_flight}"
    results["primary"] = primary
    ext, bare = results["extract"], results["bare"]
    results["ratios"][f"(b) extract 1x{t} in_flight {args.in_flight} / bare {t}"] = (ext[primary]["views_per_s"]
                                                                                  / bare[str(t)]["views_per_s"])
    serial = f"1 actor(s) x {t} thread(s), in_flight 1"
    results["like_for_like"] = serial  # the extraction run that keeps no more than T cores busy
    if serial != primary:
        results["ratios"][f"(b) extract 1x{t} in_flight 1 / bare {t}"] = (ext[serial]["views_per_s"]
                                                                          / bare[str(t)]["views_per_s"])
    if 2 * t <= cpus:
        one = ext[f"1 actor(s) x {2 * t} thread(s), in_flight {args.in_flight}"]
        two = ext[f"2 actor(s) x {t} thread(s), in_flight {args.in_flight}"]
        results["ratios"][f"(c) extract 2x{t} / extract 1x{2 * t}"] = two["views_per_s"] / one["views_per_s"]
        results["ratios"][f"(c) extract 2x{t} / extract 1x{t}"] = two["views_per_s"] / ext[primary]["views_per_s"]
        results["ratios"][f"    bare {2 * t} / bare {t} threads"] = (bare[str(2 * t)]["views_per_s"]
                                                                      / bare[str(t)]["views_per_s"])
    results["profile"] = micro_profile(setup, args)
    say("(d) codecs ...")
    local_url = ext[primary]["cache_url"]
    results["codecs"] = codec_sizes(setup, args, local_url)
    say("(e) reads ...")
    results["reads"] = [read_pattern(local_url, args, "local disk (page-cached)", p) for p in READ_PATTERNS]
    if not args.skip_s3:
        results["reads"] += s3_reads(local_url, args)
    forward_rate = bare[str(t)]["views_per_s"]
    for r in results["reads"]:
        r["feeds_forward_rate"] = r["views_per_s"] / forward_rate
    return results


def main(argv: list[str] | None = None) -> int:
    return common.bench_main(parse_args(argv), run, render)


if __name__ == "__main__":
    raise SystemExit(main())
