"""The ViT-B/16 parts of ``gpu_check.py``: extraction (c), training steps (d) and the loader alone (e).

Every function takes the run's :class:`CheckContext` (device, sizes, work directory, shared results) and fills a
section dict ``out`` as it goes, so a section stopped by its time cap still leaves what it measured.

Shapes come from ``configs/imagenet_vitb_mae.yaml`` (ViT-B/16 base and new model at 224, decoder 512 × 2 blocks,
16 heads, k_max = topk = 15) with overrides for the check (V = 2, small units, one in-process worker); ``--quick``
swaps in the pico ViTs at 32 px so the same code runs on a CPU in seconds. Images are a synthetic ImageFolder of
JPEGs written on the spot; the base checkpoint is a randomly initialised ViT in MAE format (random weights change no
throughput: same shapes, same MACs).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import config as C
from stages import device as D
from stages.cache import open_cache
from stages.extract import ExtractJob, run_extract
from stages.images import ImageSource
from stages.manifest import manifest_from_image_folder, write_manifest
from stages.train import TargetProvider, make_plan, optimizer_step
from stages.train.data import SamplePlan, TrainBatches, make_loader
from stages.train.job import TrainJob
from tec_model import BaseModel, build_vit
from tec_model.flops import vit_forward_macs
from tec_model.optim import param_groups, scaled_lr

try:  # as ``python -m benchmarks.gpu_check`` or as a script (then benchmarks/ is sys.path[0])
    from benchmarks import bench_train, common
except ImportError:  # pragma: no cover
    import bench_train  # type: ignore[no-redef]
    import common  # type: ignore[no-redef]

log = logging.getLogger("gpu_check")

VITB_CONFIG = "configs/imagenet_vitb_mae.yaml"
GOAL_EXTRACT_RATIO = 0.9
GOAL_CACHED_OVER_RAM = 0.95


@dataclass(frozen=True)
class Sizes:
    """Shapes and counts of the ViT-B parts (``quick``: tiny ones for a CPU)."""

    overrides: tuple[str, ...]
    image_px: int
    images: int
    unit_size: int
    extract_batch: int
    bare_batch: int
    train_batch: int
    warmup: int
    steps: int
    loader_workers: int
    matmul_n: int
    timed_seconds: float
    probe_batches: int

    @classmethod
    def full(cls, cpus: int) -> Sizes:
        # the config's 8 loader workers (fewer on a smaller machine); the warm-up covers their start and the
        # batches they have ready by then, so the timed steps see the loader's steady rate
        workers = max(1, min(8, cpus - 2))
        return cls(overrides=(), image_px=224, images=3072, unit_size=256, extract_batch=256, bare_batch=256,
                   train_batch=64, warmup=workers + 2, steps=24, loader_workers=workers, matmul_n=8192,
                   timed_seconds=5.0, probe_batches=8)

    @classmethod
    def quick(cls) -> Sizes:
        small = ("base.arch=vit_pico_patch4_32", "model.arch=vit_pico_patch4_32", "extract.k_max=8",
                 "model.topk=4", "model.decoder_dim=64", "model.decoder_heads=4")
        return cls(overrides=small, image_px=48, images=128, unit_size=64, extract_batch=64, bare_batch=64,
                   train_batch=32, warmup=1, steps=3, loader_workers=0, matmul_n=512, timed_seconds=0.5,
                   probe_batches=2)


@dataclass
class CheckContext:
    """What every section of one run shares."""

    device: torch.device
    label: str
    workdir: Path
    sizes: Sizes
    say: Callable[[str], None]
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------------------ set-up
def write_image_folder(root: Path, n: int, px: int, classes: int = 4, seed: int = 0) -> None:
    """``n`` synthetic ``px``×``px`` RGB JPEGs in ``root/c<k>/``: smooth colour fields with some texture."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        smooth = np.asarray(small.resize((px, px), Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(smooth + rng.integers(-10, 11, (px, px, 3)), 0, 255).astype(np.uint8)
        path = root / f"c{i % classes}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, "JPEG", quality=90)


def vitb_setup(ctx: CheckContext) -> dict[str, Any]:
    """Images, manifest, random MAE-format base checkpoint, and the extraction and training jobs (cached once)."""
    if "vitb" in ctx.shared:
        return ctx.shared["vitb"]
    s, root = ctx.sizes, ctx.workdir / "vitb"
    t0 = time.perf_counter()
    write_image_folder(root / "images", s.images, s.image_px)
    manifest_url = str(root / "manifest.parquet")
    write_manifest(manifest_from_image_folder(str(root / "images")), manifest_url)
    t1 = time.perf_counter()
    cfg = C.load_config(VITB_CONFIG, [*s.overrides, "extract.views_per_image=2", f"extract.unit_size={s.unit_size}",
                                      f"extract.batch_size={s.extract_batch}", "extract.num_actors=0",
                                      f"train.global_batch={s.train_batch}", "train.accum_steps=1",
                                      "train.num_workers=0", f"train.use_gpu={str(ctx.cuda).lower()}",
                                      f"train.loader_workers={s.loader_workers}"])
    base_kw = C.base_timm_kwargs(cfg)
    torch.manual_seed(0)
    checkpoint_url = str(root / "base_mae.pth")
    torch.save({"model": build_vit(base_kw).state_dict()}, checkpoint_url)
    cache_url = str(root / "cache")
    extract_job = C.to_extract_job(cfg, cache_url=cache_url, manifest_url=manifest_url, checkpoint_url=checkpoint_url)
    train_job = C.to_train_job(cfg, cache_url=cache_url, run_name="gpu-check-vitb", storage_path=str(root / "runs"),
                               manifest_url=manifest_url, checkpoint_url=checkpoint_url)
    ctx.shared["vitb"] = {"extract_job": extract_job, "train_job": train_job, "base_kwargs": base_kw,
                          "images_s": t1 - t0, "checkpoint_s": time.perf_counter() - t1}
    return ctx.shared["vitb"]


def real_views(job: ExtractJob, n: int) -> torch.Tensor:
    """``n`` views of the manifest's images built by the extract stage's own functions; float32 (n, C, S, S)."""
    from stages.manifest import read_manifest

    uris = read_manifest(job.manifest_url)[0].column("uri").to_pylist()
    source = ImageSource(in_chans=job.timm_kwargs.get("in_chans", 3))
    views = []
    for k in range(n):
        index, view = (k // job.views_per_image) % len(uris), k % job.views_per_image
        image = source.read(uris[index])
        views.append(job.preprocess.build(image, job.preprocess.plan(job.view_seed, index, view, *image.shape[:2])))
    return torch.stack(views)


def timed_repeats(ctx: CheckContext, fn: Callable[[], Any], seconds: float) -> tuple[int, float]:
    """Run ``fn`` (after 2 warm-up calls) a fixed number of times sized to about ``seconds``; (calls, seconds)."""
    for _ in range(2):
        fn()
    ctx.sync()
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    once = max(time.perf_counter() - t0, 1e-6)
    n = max(3, int(seconds / once))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    ctx.sync()
    return n, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ (c)
def matmul_peak(ctx: CheckContext, dtype: torch.dtype) -> dict[str, Any]:
    """The device's measured dense matmul rate: an n×n×n product in ``dtype``, repeated (FLOP/s = 2n³/s)."""
    n = ctx.sizes.matmul_n
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    calls, seconds = timed_repeats(ctx, lambda: a @ b, ctx.sizes.timed_seconds / 2)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "calls": calls,
            "tflops": 2 * n**3 * calls / seconds / 1e12}


def bare_forward(ctx: CheckContext, job: ExtractJob, precision: str) -> dict[str, Any]:
    """Views/s of the bare batched ``BaseModel`` forward on real views already on the device."""
    model = BaseModel(job.timm_kwargs, job.last_layers, job.k_max).to(ctx.device)
    pixels = real_views(job, ctx.sizes.bare_batch).to(ctx.device)

    def forward() -> None:
        with D.autocast(ctx.device, precision):
            model(pixels)

    calls, seconds = timed_repeats(ctx, forward, ctx.sizes.timed_seconds)
    return {"batch": len(pixels), "views_per_s": calls * len(pixels) / seconds}


def section_extract(ctx: CheckContext, out: dict[str, Any]) -> None:
    """(c) bare batched forward (views/s, MFU against the measured matmul peak) vs ``run_extract`` in-process."""
    setup = vitb_setup(ctx)
    job: ExtractJob = setup["extract_job"]
    precision = D.extraction_precision(job.precision, ctx.device)
    macs = vit_forward_macs(job.timm_kwargs)
    out.update(precision=precision, base_gmacs_per_view=macs / 1e9, images=ctx.sizes.images,
               views=ctx.sizes.images * job.views_per_image, setup_images_s=setup["images_s"])
    peak = out["matmul_peak"] = matmul_peak(ctx, getattr(torch, precision))
    ctx.say(f"(c) measured {peak['dtype']} matmul peak ({peak['n']}^3): {peak['tflops']:.1f} TFLOP/s")
    out["bare"] = bare_forward(ctx, job, precision)
    bare = out["bare"]["views_per_s"]
    out["bare"]["mfu"] = bare * 2 * macs / (peak["tflops"] * 1e12)
    ctx.say(f"(c) bare {precision} forward, batch {out['bare']['batch']}: {bare:.0f} views/s, MFU "
            f"{out['bare']['mfu']:.3f} of the measured peak")
    result = run_extract(job, num_actors=0)
    rate = result.views_written / result.work_seconds
    out["extract"] = {"views": result.views_written, "work_seconds": result.work_seconds,
                      "wall_seconds": result.wall_seconds, "views_per_s": rate,
                      "views_per_s_wall": result.views_written / result.wall_seconds,
                      "mfu": rate * 2 * macs / (peak["tflops"] * 1e12), "stored_mb": result.stored_bytes / 1e6,
                      "raw_mb": result.raw_bytes / 1e6, "breakdown_ms_per_view": unit_breakdown(job)}
    out["ratio_extract_over_bare"] = {"value": rate / bare, "goal": GOAL_EXTRACT_RATIO,
                                      "met": rate / bare >= GOAL_EXTRACT_RATIO}
    b = out["extract"]["breakdown_ms_per_view"]
    ctx.say(f"(c) run_extract in-process: {rate:.0f} views/s = {rate / bare:.3f}x bare (goal >= "
            f"{GOAL_EXTRACT_RATIO}); ms/view load {b['load']:.3f}, forward {b['forward']:.3f}, write {b['write']:.3f}")


def unit_breakdown(job: ExtractJob) -> dict[str, float]:
    """Per-view milliseconds of load, forward and write, from the units' markers (:func:`common.unit_breakdown`)."""
    b = common.unit_breakdown(open_cache(job.cache_url), job.views_per_image)
    return {"load": b["load_ms_per_view"], "forward": b["forward_ms_per_view"], "write": b["write_ms_per_view"]}


def ensure_cache(ctx: CheckContext) -> None:
    """The ViT-B cache, extracted (or finished) in-process when section (c) did not complete it."""
    job = vitb_setup(ctx)["extract_job"]
    try:
        cache = open_cache(job.cache_url)
        if len(cache.complete_units()) == cache.n_units:
            return
    except FileNotFoundError:
        pass
    ctx.say("extracting the ViT-B cache first (section (c) did not finish it) ...")
    run_extract(job, num_actors=0)


# ------------------------------------------------------------------------------------------------ (d)
def batches(job: TrainJob, plan: SamplePlan, cached: bool, workers: int, pin: bool) -> Iterable[dict[str, Any]]:
    """The train loop's batches of epoch 0 from step 0 (rank 0), as ``train_worker`` builds them."""
    data = TrainBatches(plan, 0, 0, 0, manifest_url=job.manifest_url, preprocess=job.preprocess_obj(),
                        in_chans=job.base_timm_kwargs.get("in_chans", 3),
                        cache_url=job.cache_url if cached else None, view_seed=job.view_seed)
    return make_loader(data, num_workers=workers, pin_memory=pin)


def run_variant(ctx: CheckContext, job: TrainJob, data: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``warmup`` untimed then ``steps`` timed ``optimizer_step`` calls with a fresh model and AdamW."""
    s = ctx.sizes
    torch.manual_seed(job.seed)
    model = job.build_model().to(ctx.device)
    opt = torch.optim.AdamW(param_groups(model, job.weight_decay), lr=scaled_lr(job.blr, job.global_batch),
                            betas=(0.9, 0.95))
    precision = D.train_precision(ctx.device, job.amp_dtype)
    scaler = D.make_grad_scaler(ctx.device, precision)
    source = TargetProvider(job, ctx.device)
    it = iter(data)
    waits, loss = [], float("nan")
    window = 0.0
    for step in range(s.warmup + s.steps):
        if step == s.warmup:
            ctx.sync()
            window = time.perf_counter()
        t0 = time.perf_counter()
        batch = next(it)
        if step >= s.warmup:
            waits.append(time.perf_counter() - t0)
        loss = optimizer_step(job, model, opt, scaler, source, batch, ctx.device, precision, step, 0, 1)["loss"]
    ctx.sync()
    seconds = time.perf_counter() - window
    del it, model, opt, source
    if ctx.cuda:
        torch.cuda.empty_cache()
    return {"steps": s.steps, "batch": job.global_batch, "precision": precision, "seconds": seconds,
            "samples_per_s": s.steps * job.global_batch / seconds, "step_ms": 1e3 * seconds / s.steps,
            "wait_share": float(np.sum(waits)) / seconds, "last_loss": loss}


def base_forward_ms(ctx: CheckContext, job: TrainJob, pixels: torch.Tensor) -> float:
    """Milliseconds of the online base forward on one batch (``TargetProvider.targets``, its precision)."""
    source = TargetProvider(job.replace(target_source="online"), ctx.device)
    pixels = pixels.to(ctx.device)
    calls, seconds = timed_repeats(ctx, lambda: source.targets({}, pixels), ctx.sizes.timed_seconds / 2)
    return 1e3 * seconds / calls


def section_train(ctx: CheckContext, out: dict[str, Any]) -> None:
    """(d) TEC steps with targets in RAM, from the local cache, and from the online base; side by side."""
    ensure_cache(ctx)
    s, job = ctx.sizes, vitb_setup(ctx)["train_job"]
    plan, _ = make_plan(job, 1)
    total = s.warmup + s.steps
    if plan.steps_per_epoch() < total:
        raise ValueError(f"{plan.n_valid} images give {plan.steps_per_epoch()} steps of {job.global_batch}; "
                         f"warm-up + steps = {total}: raise the image count")
    pin = D.pin_memory_for(ctx.device)
    out.update(batch=job.global_batch, warmup=s.warmup, steps=s.steps, loader_workers=s.loader_workers,
               pin_memory=pin, flops=bench_train.flop_budget(job))
    ram = []
    for batch in batches(job, plan, True, s.loader_workers, pin):
        ram.append(batch)
        if len(ram) == total:
            break
    gc.collect()  # shuts the preload's loader workers down
    variants = out["variants"] = {}
    for name, vjob, data in (("ram", job, ram), ("cached", job, None),
                             ("online", job.replace(target_source="online"), None)):
        feed = data if data is not None else batches(vjob, plan, name == "cached", s.loader_workers, pin)
        variants[name] = run_variant(ctx, vjob, feed)
        v = variants[name]
        ctx.say(f"(d) {name}: {v['samples_per_s']:.0f} samples/s ({v['step_ms']:.1f} ms/step, loader wait "
                f"{100 * v['wait_share']:.1f} %), loss {v['last_loss']:.4f}")
    ctx.shared["train_samples_per_s"] = {k: v["samples_per_s"] for k, v in variants.items()}
    t_base = out["base_forward_ms_per_batch"] = base_forward_ms(ctx, job, ram[0]["pixels"])
    out["ratios"] = train_ratios(variants, t_base)
    r = out["ratios"]
    ctx.say(f"(d) cached/ram {r['cached_over_ram']['value']:.3f} (goal >= {GOAL_CACHED_OVER_RAM}); cached/online "
            f"{r['cached_over_online']['value']:.3f} against the measured limit {r['cached_over_online']['limit']:.3f}"
            f" (base forward {t_base:.1f} ms/batch) = {r['cached_over_online']['of_limit']:.3f} of it")


def train_ratios(variants: dict[str, dict[str, Any]], t_base_ms: float) -> dict[str, Any]:
    """cached/ram against its goal; cached/online against the measured limit (t_cached + t_base) / t_cached."""
    t_cached, t_ram = variants["cached"]["step_ms"], variants["ram"]["step_ms"]
    cached_online = variants["cached"]["samples_per_s"] / variants["online"]["samples_per_s"]
    ram_online = variants["ram"]["samples_per_s"] / variants["online"]["samples_per_s"]
    limit, ram_limit = (t_cached + t_base_ms) / t_cached, (t_ram + t_base_ms) / t_ram
    cached_ram = variants["cached"]["samples_per_s"] / variants["ram"]["samples_per_s"]
    return {"cached_over_ram": {"value": cached_ram, "goal": GOAL_CACHED_OVER_RAM,
                                "met": cached_ram >= GOAL_CACHED_OVER_RAM},
            "cached_over_online": {"value": cached_online, "limit": limit, "of_limit": cached_online / limit},
            "ram_over_online": {"value": ram_online, "limit": ram_limit, "of_limit": ram_online / ram_limit}}


# ------------------------------------------------------------------------------------------------ (e)
def one_worker(job: TrainJob, plan: SamplePlan, cached: bool, n: int) -> dict[str, Any]:
    """What one loader worker delivers: ``TrainBatches`` iterated in this process with one torch thread, as a
    DataLoader worker runs it: a fresh reader from step 1 on, timed from its opening (after one untimed batch of
    another reader, so imports and first file opens are not counted)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def dataset(start: int) -> TrainBatches:
            return TrainBatches(plan, 0, 0, start, manifest_url=job.manifest_url, preprocess=job.preprocess_obj(),
                                in_chans=job.base_timm_kwargs.get("in_chans", 3),
                                cache_url=job.cache_url if cached else None, view_seed=job.view_seed)

        next(iter(dataset(0)))  # imports, first file opens
        n = min(n, plan.steps_per_epoch() - 1)
        record: dict[str, Any] = {"batches": n}
        fetched = delivered = 0
        with common.timed_phase(record):  # a fresh reader: its block reads start empty, as a worker's do
            it = iter(dataset(1))
            for _ in range(n):
                batch = next(it)
                fetched += int(batch.get("bytes_fetched", 0))
                delivered += int(batch.get("bytes_read", 0))
        record.update(samples_per_s=n * plan.batch_per_rank / record["seconds"],
                      target_mb_decoded_per_s=fetched / 1e6 / record["seconds"],
                      target_mb_delivered_per_s=delivered / 1e6 / record["seconds"])
        return record
    finally:
        torch.set_num_threads(previous)


def pixel_rates(job: TrainJob, plan: SamplePlan, n: int) -> dict[str, float]:
    """Images read + decoded per second and views built per second (crop, resize, normalise), one thread."""
    from stages.manifest import read_manifest

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        uris = read_manifest(job.manifest_url)[0].column("uri").to_pylist()
        idx, views = plan.rank_batch(0, 0, 0)
        idx, views = idx[:n], views[:n]
        source, pre = ImageSource(job.timm_kwargs.get("in_chans", 3)), job.preprocess_obj()
        t0 = time.perf_counter()
        images = [source.read(uris[i]) for i in idx.tolist()]
        t1 = time.perf_counter()
        boxes = np.stack([pre.plan(job.view_seed, i, v, *im.shape[:2])
                          for i, v, im in zip(idx.tolist(), views.tolist(), images, strict=True)])
        pre.build_batch(images, boxes)
        t2 = time.perf_counter()
        return {"images": len(images), "decoded_per_s": len(images) / (t1 - t0), "views_built_per_s":
                len(images) / (t2 - t1)}
    finally:
        torch.set_num_threads(previous)


def many_workers(job: TrainJob, plan: SamplePlan, workers: int, pin: bool) -> dict[str, Any]:
    """The cached loader alone with ``workers`` spawned workers (no compute) over the rest of the epoch.

    The workers start together, so when the first batch arrives the others' first batches are ready too: the
    steady rate is taken from batch ``workers`` on (``steady`` is false when fewer than ``workers`` batches are
    left after it, and the rate then spans everything after the first batch).
    """
    it = iter(batches(job, plan, True, workers, pin))
    t0 = time.perf_counter()
    next(it)
    arrivals = [time.perf_counter()]
    record: dict[str, Any] = {"workers": workers, "first_batch_s": arrivals[0] - t0}
    meter = common.CpuMeter()
    meter.start()
    for _ in range(plan.steps_per_epoch() - 1):
        next(it)
        arrivals.append(time.perf_counter())
    record["busy_cores"] = meter.stop()
    del it
    n = len(arrivals) - 1
    start = workers if n - workers >= workers else 0
    record.update(batches=n, steady=start > 0, samples_per_s=(n - start) * plan.batch_per_rank /
                  (arrivals[-1] - arrivals[start]))
    return record


def section_loader(ctx: CheckContext, out: dict[str, Any]) -> None:
    """(e) the loader alone at the ViT-B shapes, and the loader workers the measured step rates need."""
    ensure_cache(ctx)
    s, job = ctx.sizes, vitb_setup(ctx)["train_job"]
    plan, _ = make_plan(job, 1)
    n = s.probe_batches
    cached = out["one_worker_cached"] = one_worker(job, plan, True, n)
    ctx.say(f"(e) one loader worker, cached: {cached['samples_per_s']:.0f} samples/s, targets decoded "
            f"{cached['target_mb_decoded_per_s']:.0f} MB/s (delivered {cached['target_mb_delivered_per_s']:.0f} "
            f"MB/s), {cached['own_cores']:.2f} cores")
    online = out["one_worker_online"] = one_worker(job, plan, False, n)
    pixels = out["pixels_one_thread"] = pixel_rates(job, plan, plan.batch_per_rank)
    ctx.say(f"(e) one loader worker, online (pixels only): {online['samples_per_s']:.0f} samples/s; decode "
            f"{pixels['decoded_per_s']:.0f} images/s, build {pixels['views_built_per_s']:.0f} views/s")
    workers = max(1, s.loader_workers)
    many = out["many_workers_cached"] = many_workers(job, plan, workers, D.pin_memory_for(ctx.device))
    many["scaling"] = many["samples_per_s"] / (workers * cached["samples_per_s"])
    ctx.say(f"(e) {workers} spawned loader worker(s), cached, no compute: {many['samples_per_s']:.0f} samples/s "
            f"({many['scaling']:.2f} of {workers} x one worker; steady window: {many['steady']}); machine busy "
            f"{many['busy_cores']:.1f} cores")
    rates = ctx.shared.get("train_samples_per_s")
    if rates:
        need = out["workers_needed"] = {
            "for_ram_step_rate_cached": math.ceil(rates["ram"] / cached["samples_per_s"]),
            "for_online_step_rate_online": math.ceil(rates["online"] / online["samples_per_s"]),
            "ram_step_samples_per_s": rates["ram"], "online_step_samples_per_s": rates["online"],
            "cpu_count": os.cpu_count()}
        ctx.say(f"(e) loader workers needed: {need['for_ram_step_rate_cached']} (cached, at the in-RAM step rate "
                f"{rates['ram']:.0f} samples/s), {need['for_online_step_rate_online']} (online, at "
                f"{rates['online']:.0f} samples/s)")
