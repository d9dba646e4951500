"""Benchmark of the train stage's step throughput: cached targets vs the online base model, in one run.

Same model, same global batch, same torch thread count, one process; every step goes through the train stage's
own ``optimizer_step`` (``stages/train/step.py``), with batches from:

(a) the target cache on local disk: ``TrainBatches(cache_url=<local>)`` through ``make_loader`` (spawned workers);
(b) the same cache on a moto S3 server on 127.0.0.1 (``TrainBatches(cache_url="s3://...")``; the manifest stays
    local; the server runs in a spawned child process);
(c) every batch of the timed window read from the local cache beforehand into a Python list (targets and pixels
    already decoded): compute only, the upper bound;
(d) online: ``TrainBatches`` without a cache (views planned from ``view_seed``, pixels built by the loader) and
    ``TargetProvider(job, device)`` with ``target_source="online"``, so the frozen base model runs on every step.

It reports a/c (goal >= 0.97), b/c (goal >= 0.93) and a/d against the measured limit
``(t_cached + t_base_forward) / t_cached`` (one step's parts, timed; the FLOP figure ``1 + F_base/F_step`` beside it)
(goal: a/d >= 0.95 of it), where ``F_base`` is the base model's forward MACs per view (``vit_forward_macs``) and
``F_step`` the cached training step's MACs per sample (analytic: ``pipeline.flops.tec_step_macs``, 3 x forward;
cross-checked with ``FlopCounterMode``).
The model pair is chosen so that the base forward is about 40 % of an online step, as for ViT-B TEC.

The target cache is extracted first with ``run_extract`` from real Fashion-MNIST images (an ``idx://`` manifest) and a
randomly initialised base ViT saved in MAE format; random weights change no throughput (same shapes, same MACs).

Run ``.venv/bin/python benchmarks/bench_train.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.flops import base_macs_per_view, tec_step_macs
from stages.extract import ExtractJob, run_extract
from stages.train import TargetProvider, make_plan, optimizer_step, run_train
from stages.train.data import SamplePlan, TrainBatches, make_loader
from stages.train.job import TrainJob
from stages.views import Preprocess
from tec_model import BaseModel, num_patches, vit_kwargs
from tec_model.optim import param_groups, scaled_lr

try:  # as ``python -m benchmarks.bench_train`` or as a script (then benchmarks/ is sys.path[0])
    from benchmarks import common
except ImportError:  # pragma: no cover
    import common  # type: ignore[no-redef]

log = logging.getLogger("bench_train")

GOAL_A_OVER_C = 0.97
GOAL_B_OVER_C = 0.93
GOAL_A_OVER_D_OF_THEORY = 0.95
VARIANTS = {
    "a": "cached, local store",
    "b": "cached, S3 (moto, 127.0.0.1)",
    "c": "targets pre-loaded in RAM",
    "d": "online base model",
}


# ------------------------------------------------------------------------------------------------ FLOPs
def base_model_extra_macs(base_kwargs: dict[str, Any], k_max: int) -> int:
    """MACs ``BaseModel`` spends beyond ``vit_forward_macs`` per view: the last block's q/k projection computed a
    second time (``last_block_qk``: ``T·C·3C``) and the kept logits (cls row + k_max rows over L keys, all heads)."""
    c, length = base_kwargs["embed_dim"], num_patches(base_kwargs)
    return (1 + length) * c * 3 * c + (1 + k_max) * length * c


def tec_step(job: TrainJob) -> dict[str, Any]:
    """:func:`pipeline.flops.tec_step_macs` of the job's new model against its base model (MACs per sample)."""
    base = job.base_timm_kwargs
    return tec_step_macs(job.timm_kwargs, base["embed_dim"], base["num_heads"], num_patches(base),
                         mask_ratio=job.mask_ratio, adapters=job.adapters, attention_target=job.attention_target,
                         topk=job.topk, decoder_dim=job.decoder_dim, decoder_depth=job.decoder_depth,
                         decoder_heads=job.decoder_heads)


def flop_budget(job: TrainJob) -> dict[str, Any]:
    """F_base, F_step (per sample, MACs) and what they imply: base fraction of an online step, ideal speed-up.

    ``F_step`` is :func:`pipeline.flops.tec_step_macs`'s ``train_macs_per_sample`` (3 x the TEC forward: forward +
    backward, as the ledger counts it), ``F_base`` :func:`pipeline.flops.base_macs_per_view`.
    """
    step = tec_step(job)
    fwd = {k: v for k, v in step.items() if k.endswith("_macs") and k != "forward_macs"}
    f_step = step["train_macs_per_sample"]
    f_base = base_macs_per_view(job.base_timm_kwargs)
    f_base_impl = f_base + base_model_extra_macs(job.base_timm_kwargs, job.k_max)
    return {
        "convention": "MACs per sample (1 MAC = 2 FLOPs of torch's FlopCounterMode)",
        "tec_forward_macs_by_part": fwd, "tec_forward_macs": step["forward_macs"], "F_step": f_step,
        "F_base": f_base, "F_base_as_implemented": f_base_impl,
        "base_fraction_of_online_step": f_base / (f_base + f_step),
        "theoretical_speedup": 1 + f_base / f_step,
        "theoretical_speedup_as_implemented": 1 + f_base_impl / f_step,
    }


def _unfuse_attention(module: nn.Module) -> None:
    """Make every timm block compute attention with explicit matmuls, which ``FlopCounterMode`` counts."""
    for block in module.modules():
        if isinstance(block, Block):
            block.attn.fused_attn = False


def count_flops(job: TrainJob, batch: dict[str, Any], n: int = 8) -> dict[str, Any]:
    """``FlopCounterMode`` MACs per sample of one real step (forward, backward) and of the base forward.

    Uses the first ``n`` samples of ``batch`` (pixels and cached targets) and fresh models with unfused attention.
    """
    torch.manual_seed(job.seed)
    model = job.build_model()
    _unfuse_attention(model)
    base = BaseModel(job.base_timm_kwargs, job.last_layers, job.k_max)
    _unfuse_attention(base)
    pixels = batch["pixels"][:n]
    features, attn, topk = (batch[k][:n] for k in ("features", "attn_logits", "topk_index"))
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = model(pixels, features.float(), attn.float(), topk.long())
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    backward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        base(pixels)
    base_flops = counter.get_total_flops()
    per = 2 * n  # FLOPs -> MACs, per sample
    return {"samples": n, "tec_forward_macs": forward / per, "tec_backward_macs": backward / per,
            "F_step": (forward + backward) / per, "backward_over_forward": backward / forward,
            "F_base_as_implemented": base_flops / per}


# ------------------------------------------------------------------------------------------------ setup
@dataclass(frozen=True)
class Setup:
    """Inputs shared by every variant."""

    workdir: Path
    manifest_url: str
    checkpoint_url: str
    cache_url: str
    job: TrainJob
    extract: dict[str, Any]


def model_kwargs(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(new, base) timm kwargs: grey ``--img-size`` views, patch 4, the widths/depths/heads of the flags."""
    common = {"img_size": args.img_size, "patch_size": args.patch_size, "in_chans": 1}
    new = vit_kwargs("vit_micro_patch4_32", embed_dim=args.new_dim, depth=args.new_depth, num_heads=args.new_heads,
                     **common)
    base = vit_kwargs("vit_mini_patch4_32", embed_dim=args.base_dim, depth=args.base_depth,
                      num_heads=args.base_heads, **common)
    return new, base


def make_job(args: argparse.Namespace, workdir: Path, manifest_url: str, checkpoint_url: str, cache_url: str,
             new: dict[str, Any], base: dict[str, Any], preprocess: Preprocess) -> TrainJob:
    """The cached-mode training job every variant starts from."""
    return TrainJob(
        run_name="bench_train", storage_path=str(workdir / "runs"), timm_kwargs=new, base_timm_kwargs=base,
        preprocess=preprocess.to_dict(), target_source="cache", cache_url=cache_url, manifest_url=manifest_url,
        checkpoint_url=checkpoint_url, views_per_image=args.views, view_seed=0, k_max=args.k_max, topk=args.k_max,
        decoder_dim=args.decoder_dim, decoder_heads=args.decoder_heads, global_batch=args.batch, num_workers=1,
        threads_per_worker=args.threads, loader_workers=args.loader_workers, seed=0,
    )


def make_setup(args: argparse.Namespace, say: Callable[[str], None]) -> Setup:
    """Manifest (first ``--images`` Fashion-MNIST records), random MAE-format base checkpoint, extracted cache."""
    import ray

    new, base = model_kwargs(args)
    manifest_url, checkpoint_url = common.write_manifest_and_checkpoint(args.workdir, args.idx, args.images, base)
    preprocess = Preprocess.fashion_mnist(args.img_size, 1)
    cache_url = str(args.workdir / "cache")
    say(f"extracting the target cache: {args.images} images x {args.views} views, {args.extract_actors} actor(s) ...")
    result = run_extract(
        ExtractJob(cache_url=cache_url, manifest_url=manifest_url, checkpoint_url=checkpoint_url, timm_kwargs=base,
                   preprocess=preprocess, views_per_image=args.views, k_max=args.k_max, unit_size=args.unit_size,
                   batch_size=64),
        num_actors=args.extract_actors, threads_per_actor=1, in_flight_per_actor=1)
    ray.shutdown()  # no idle Ray processes during the timed phases (run_train starts it again if asked)
    extract = {"views": result.views_written, "work_seconds": result.work_seconds,
               "wall_seconds": result.wall_seconds, "stored_mb": result.stored_bytes / 1e6,
               "raw_mb": result.raw_bytes / 1e6, "failures": result.failures}
    job = make_job(args, args.workdir, manifest_url, checkpoint_url, cache_url, new, base, preprocess)
    return Setup(args.workdir, manifest_url, checkpoint_url, cache_url, job, extract)


def batches_of(job: TrainJob, plan: SamplePlan, cached: bool, num_workers: int) -> Iterable[dict[str, Any]]:
    """The train loop's batches of epoch 0 from step 0, as ``train_worker`` builds them (rank 0)."""
    data = TrainBatches(plan, 0, 0, 0, manifest_url=job.manifest_url, preprocess=job.preprocess_obj(),
                        in_chans=job.base_timm_kwargs.get("in_chans", 3),
                        cache_url=job.cache_url if cached else None, view_seed=job.view_seed)
    return make_loader(data, num_workers=num_workers)


# ------------------------------------------------------------------------------------------------ variants
def run_variant(kind: str, job: TrainJob, plan: SamplePlan, args: argparse.Namespace,
                ram: list[dict[str, Any]] | None = None, groups: dict[str, set[int]] | None = None) -> dict[str, Any]:
    """Warm up ``--warmup`` steps, then time ``--steps`` optimiser steps of one variant with a fresh model.

    Each step: ``next(batches)`` (time spent waiting on the loader) then ``optimizer_step`` (compute). The timed
    window runs from the request of the first timed batch to the end of the last step; the machine's busy cores
    are metered over it (and split by :class:`ProcessCpu`; ``groups`` names child pids such as moto's).
    """
    device = torch.device("cpu")
    torch.manual_seed(job.seed)
    core = job.build_model().to(device)
    opt = torch.optim.AdamW(param_groups(core, job.weight_decay), lr=scaled_lr(job.blr, job.global_batch),
                            betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    source = TargetProvider(job, device)
    total = args.warmup + args.steps
    if kind == "c":
        assert ram is not None and len(ram) >= total
        loader: Iterable[dict[str, Any]] = ram
    else:
        loader = batches_of(job, plan, cached=kind != "d", num_workers=args.loader_workers)
    it: Iterator[dict[str, Any]] = iter(loader)
    started = time.perf_counter()
    meter = common.ProcessCpu(groups)
    waits, computes, ends = [], [], []
    bytes_read = 0
    t_first = window_start = 0.0
    for step in range(total):
        if step == args.warmup:
            meter.start()
            window_start = time.perf_counter()
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        optimizer_step(job, core, opt, scaler, source, batch, device, "float32", step, 0, 1)
        t2 = time.perf_counter()
        if step == 0:
            t_first = t2 - started
        if step >= args.warmup:
            waits.append(t1 - t0)
            computes.append(t2 - t1)
            ends.append(t2)
            bytes_read += int(batch.get("bytes_read", 0))
    cpu = meter.stop()
    seconds = ends[-1] - window_start
    del it, loader
    gc.collect()  # shuts the DataLoader workers down before the next variant starts
    quarters = np.array_split(np.arange(args.steps), min(4, args.steps))
    bounds = [window_start, *ends]
    quarter_rates = [len(q) / (bounds[q[-1] + 1] - bounds[q[0]]) for q in quarters]
    return {
        "variant": kind, "label": VARIANTS[kind], "steps": args.steps, "warmup": args.warmup,
        "global_batch": job.global_batch, "seconds": seconds, "steps_per_s": args.steps / seconds,
        "samples_per_s": args.steps * job.global_batch / seconds,
        "quarter_steps_per_s": quarter_rates,
        "wait_s": float(np.sum(waits)), "compute_s": float(np.sum(computes)),
        "wait_share": float(np.sum(waits)) / seconds, "wait_max_s": float(np.max(waits)),
        "compute_ms_per_step": 1e3 * float(np.mean(computes)),
        "compute_ms_per_step_median": 1e3 * float(np.median(computes)),
        "busy_cores": cpu["busy"], "cpu_cores": cpu, "first_step_s": t_first, "target_mb_read": bytes_read / 1e6,
    }


def preload(job: TrainJob, plan: SamplePlan, n: int) -> list[dict[str, Any]]:
    """The first ``n`` batches from the local cache, read in this process (variant c's RAM copy)."""
    out = []
    for batch in batches_of(job, plan, cached=True, num_workers=0):
        out.append(batch)
        if len(out) == n:
            break
    return out


def loader_probe(job: TrainJob, plan: SamplePlan, cached: bool, args: argparse.Namespace,
                 groups: dict[str, set[int]] | None = None) -> dict[str, Any]:
    """Batches/s of the loader alone (no compute), after its first batch: how much headroom it has."""
    it = iter(batches_of(job, plan, cached, args.loader_workers))
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    meter = common.ProcessCpu(groups)
    meter.start()
    t0 = time.perf_counter()
    n = min(args.probe_steps, plan.steps_per_epoch() - 1)
    for _ in range(n):
        next(it)
    seconds = time.perf_counter() - t0
    cpu = meter.stop()
    del it
    gc.collect()
    return {"batches": n, "seconds": seconds, "batches_per_s": n / seconds, "ms_per_batch": 1e3 * seconds / n,
            "first_batch_s": first, "busy_cores": cpu["busy"], "cpu_cores": cpu}


def profile_step(job: TrainJob, batch: dict[str, Any], online: bool, repeats: int = 3) -> dict[str, float]:
    """Milliseconds of the parts of one step on ``batch`` (this process, after a warm-up step): the base forward
    (online only), the TEC forward, backward, ``opt.step`` + ``zero_grad``; and the whole ``optimizer_step`` on the
    same batch, whose excess over the parts is the train loop's per-step overhead (copies, casts, mask RNG, item()).
    """
    device = torch.device("cpu")
    torch.manual_seed(job.seed)
    model = job.build_model()
    opt = torch.optim.AdamW(param_groups(model, job.weight_decay), lr=1e-4, betas=(0.9, 0.95))
    base = TargetProvider(job.replace(target_source="online"), device) if online else None
    pixels = batch["pixels"]
    rows: list[dict[str, float]] = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        if base is not None:
            features, attn, topk = base.targets(batch, pixels)
        else:
            features, attn, topk = (batch[k] for k in ("features", "attn_logits", "topk_index"))
        t1 = time.perf_counter()
        loss, _, _ = model(pixels, features.float(), attn.float(), topk.long())
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if r:
            rows.append({"base_forward_ms": 1e3 * (t1 - t0), "tec_forward_ms": 1e3 * (t2 - t1),
                         "backward_ms": 1e3 * (t3 - t2), "optimizer_ms": 1e3 * (t4 - t3)})
    out = {k: float(np.median([row[k] for row in rows])) for k in rows[0]}
    step_job = job.replace(target_source="online") if online else job
    source = base if base is not None else TargetProvider(job, device)
    whole = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        optimizer_step(step_job, model, opt, torch.amp.GradScaler("cpu", enabled=False), source, batch, device,
                       "float32", r, 0, 1)
        if r:
            whole.append(1e3 * (time.perf_counter() - t0))
    out["optimizer_step_ms"] = float(np.median(whole))
    out["overhead_ms"] = out["optimizer_step_ms"] - sum(v for k, v in out.items() if k != "optimizer_step_ms")
    return out


def reference_run_train(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """One end-to-end ``run_train`` with 2 Ray Train workers from the local cache (reference only)."""
    job = setup.job.replace(run_name=f"bench_ray_{uuid.uuid4().hex[:6]}", num_workers=2, max_steps=args.train_steps,
                            log_every=max(1, args.train_steps // 4), checkpoint_every=10**9)
    meter = common.CpuMeter()
    meter.start()
    t0 = time.perf_counter()
    result = run_train(job)
    seconds = time.perf_counter() - t0
    m = result.metrics
    return {"workers": 2, "threads_per_worker": job.threads_per_worker, "loader_workers": job.loader_workers,
            "steps": m.get("step"), "samples_per_s_last_window": m.get("samples_per_s"),
            "wall_seconds_incl_startup": seconds, "busy_cores": meter.stop()}


# ------------------------------------------------------------------------------------------------ run
def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: mean samples/s over its repeats, and the spread (repeats, and quarters within each run)."""
    out: dict[str, Any] = {}
    for kind in VARIANTS:
        mine = [r for r in runs if r["variant"] == kind]
        if not mine:
            continue
        rates = [r["samples_per_s"] for r in mine]
        quarters = [q * r["global_batch"] for r in mine for q in r["quarter_steps_per_s"]]
        out[kind] = {"label": VARIANTS[kind], "samples_per_s": float(np.mean(rates)),
                     "steps_per_s": float(np.mean([r["steps_per_s"] for r in mine])), "repeats": rates,
                     "repeat_spread": (max(rates) - min(rates)) / float(np.mean(rates)),
                     "quarter_min": min(quarters), "quarter_max": max(quarters),
                     "wait_share": float(np.mean([r["wait_share"] for r in mine])),
                     "compute_ms_per_step": float(np.mean([r["compute_ms_per_step"] for r in mine])),
                     "target_mb_per_s": float(np.mean([r["target_mb_read"] / r["seconds"] for r in mine])),
                     "busy_cores": float(np.mean([r["busy_cores"] for r in mine])),
                     "cpu_cores": {k: float(np.mean([r["cpu_cores"].get(k, np.nan) for r in mine]))
                                   for k in mine[0]["cpu_cores"]}}
    return out


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """Extract, count FLOPs, then time the variants in ``--order`` (the moto server runs throughout)."""
    order = [v.strip() for v in args.order.split(",") if v.strip()]
    if unknown := set(order) - set(VARIANTS):
        raise SystemExit(f"--order: unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    setup = make_setup(args, say)
    job = setup.job
    plan, n_images = make_plan(job, 1)
    if plan.steps_per_epoch() < args.warmup + args.steps:
        raise SystemExit(f"{n_images} images give {plan.steps_per_epoch()} steps per epoch of {args.batch}; "
                         f"--warmup + --steps = {args.warmup + args.steps}: raise --images")
    flops = flop_budget(job)
    results: dict[str, Any] = {
        "config": {**common.config_of(args),
                   "new_timm_kwargs": job.timm_kwargs, "base_timm_kwargs": job.base_timm_kwargs,
                   "num_patches": num_patches(job.timm_kwargs), "cpu_count": os.cpu_count(),
                   "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                   "block_size": plan.block_size, "steps_per_epoch": plan.steps_per_epoch(),
                   "checkpoint": common.RANDOM_CHECKPOINT},
        "extract": setup.extract, "flops": flops,
    }
    say("reading the RAM copy for (c) and counting FLOPs ...")
    ram = preload(job, plan, args.warmup + args.steps)
    flops["flop_counter"] = count_flops(job, ram[0])
    flops["flop_counter_over_analytic"] = flops["flop_counter"]["F_step"] / flops["F_step"]
    runs: list[dict[str, Any]] = []
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # zarr's aiohttp sessions are closed only at exit
    with common.moto_server() as endpoint:
        groups = {"moto": common.child_pids()}  # the server (and multiprocessing's resource tracker, idle)
        s3_url = common.create_bucket(endpoint)
        say(f"copying the cache to moto at {endpoint} ...")
        results["s3_upload"] = common.copy_to_s3(setup.cache_url, s3_url)
        jobs = {"a": job, "b": job.replace(cache_url=s3_url), "c": job, "d": job.replace(target_source="online")}
        plans = {k: make_plan(j, 1)[0] for k, j in jobs.items()}
        for k, p in plans.items():
            assert np.array_equal(p.epoch_order(0), plan.epoch_order(0)), k  # same batches in every variant
        for kind in order:
            say(f"({kind}) {VARIANTS[kind]}: {args.warmup} warm-up + {args.steps} timed steps ...")
            record = run_variant(kind, jobs[kind], plans[kind], args, ram if kind == "c" else None, groups)
            say(f"    {record['samples_per_s']:.1f} samples/s, loader wait {100 * record['wait_share']:.1f} %, "
                f"cores: {_cpu_text(record['cpu_cores'])}")
            runs.append(record)
        if args.probe_steps:
            say("loader alone (no compute) ...")
            results["loader_probe"] = {VARIANTS[k]: loader_probe(jobs[k], plans[k], k != "d", args, groups)
                                       for k in ("a", "b", "d") if k in order}
    say("profiling one step's parts ...")
    results["step_profile"] = {"cached": profile_step(job, ram[0], online=False),
                               "online": profile_step(job, ram[0], online=True)}
    results["runs"] = runs
    summary = results["variants"] = summarize(runs)
    ratios: dict[str, Any] = {}
    c = summary.get("c", {}).get("samples_per_s")
    if c and "a" in summary:
        ratios["a/c"] = {"value": summary["a"]["samples_per_s"] / c, "goal": GOAL_A_OVER_C}
    if c and "b" in summary:
        ratios["b/c"] = {"value": summary["b"]["samples_per_s"] / c, "goal": GOAL_B_OVER_C}
    if "d" in summary:
        d = summary["d"]["samples_per_s"]
        # the measured limit of caching: an online step costs the cached step plus one base forward, both timed
        prof = results["step_profile"]
        t_cached, t_base = prof["cached"]["optimizer_step_ms"], prof["online"]["base_forward_ms"]
        limit = results["measured_limit"] = (t_cached + t_base) / t_cached
        theory = flops["theoretical_speedup"]
        if "a" in summary:
            ratios["a/d"] = {"value": summary["a"]["samples_per_s"] / d, "limit": limit, "flop_limit": theory}
            ratios["(a/d)/limit"] = {"value": ratios["a/d"]["value"] / limit, "goal": GOAL_A_OVER_D_OF_THEORY}
        if c:
            ratios["c/d"] = {"value": c / d, "limit": limit, "flop_limit": theory}
            ratios["(c/d)/limit"] = {"value": c / d / limit}
    results["ratios"] = ratios
    if args.run_train:
        say(f"reference: run_train, 2 Ray Train workers, {args.train_steps} steps ...")
        results["run_train"] = reference_run_train(setup, args)
    return results


# ------------------------------------------------------------------------------------------------ report
def _cpu_text(cpu: dict[str, float]) -> str:
    """``busy 1.93 = self 1.00 + children 0.10 + moto 0.05 + others 0.78`` (cores)."""
    if len(cpu) == 1:
        return f"busy {cpu['busy']:.2f}"
    parts = " + ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k != "busy")
    return f"busy {cpu['busy']:.2f} = {parts}"


_row = functools.partial(common.row, label_width=40, value_width=14)


def render(results: dict[str, Any]) -> str:
    """The results table printed at the end of a run."""
    cfg, f, lines = results["config"], results["flops"], []
    new, base = cfg["new_timm_kwargs"], cfg["base_timm_kwargs"]
    lines.append(
        f"Train step benchmark — new ViT C={new['embed_dim']} depth {new['depth']} H={new['num_heads']}, base ViT "
        f"C={base['embed_dim']} depth {base['depth']} H={base['num_heads']}, {new['img_size']} px grey, patch "
        f"{new['patch_size']} (L={cfg['num_patches']}), decoder {cfg['decoder_dim']}x2 ({cfg['decoder_heads']} "
        f"heads), k={cfg['k_max']}, mask 0.75; global batch {cfg['batch']}, float32 CPU, {cfg['threads']} torch "
        f"thread(s), {cfg['loader_workers']} loader worker(s), {cfg['cpu_count']} cores")
    fc = f["flop_counter"]
    lines.append("FLOPs (MACs per sample; FlopCounterMode FLOPs / 2, unfused attention)")
    lines.append(_row("F_base = vit_forward_macs(base)", f"{f['F_base'] / 1e6:.1f} M",
                      f"BaseModel as implemented {f['F_base_as_implemented'] / 1e6:.1f} M (analytic), "
                      f"{fc['F_base_as_implemented'] / 1e6:.1f} M (counter)"))
    lines.append(_row("F_step = 3 x TEC forward (analytic)", f"{f['F_step'] / 1e6:.1f} M",
                      f"counter {fc['F_step'] / 1e6:.1f} M (= {f['flop_counter_over_analytic']:.3f}x; backward "
                      f"{fc['backward_over_forward']:.2f}x forward)"))
    lines.append(_row("base share of an online step", f"{f['base_fraction_of_online_step']:.3f}",
                      "F_base / (F_base + F_step); ViT-B/16 TEC at 224: 0.41"))
    lines.append(_row("FLOP figure 1 + F_base/F_step (not a measurement)", f"{f['theoretical_speedup']:.3f}",
                      f"with BaseModel as implemented {f['theoretical_speedup_as_implemented']:.3f}"))
    lines.append("Throughput (mean over repeats; spread = (max-min)/mean of the repeats, and the slowest/fastest "
                 "quarter of any run; wait = share of the window spent waiting on the loader; cores: machine-wide "
                 "busy = this process + its loader workers (children) + the moto server + others' load)")
    for kind, s in results["variants"].items():
        reps = " / ".join(f"{r:.1f}" for r in s["repeats"])
        lines.append(_row(f"({kind}) {s['label']}", f"{s['samples_per_s']:.1f} sam/s",
                          f"{s['steps_per_s']:.3f} steps/s; runs {reps} (spread {100 * s['repeat_spread']:.1f} %); "
                          f"quarters {s['quarter_min']:.1f}-{s['quarter_max']:.1f}; compute "
                          f"{s['compute_ms_per_step']:.0f} ms/step; wait {100 * s['wait_share']:.1f} %"
                          + (f"; targets {s['target_mb_per_s']:.1f} MB/s" if s["target_mb_per_s"] else "")))
        lines.append(_row("", "", f"cores: {_cpu_text(s['cpu_cores'])}"))
    lines.append("Ratios")
    for name, r in results["ratios"].items():
        if "goal" in r:
            ok = "met" if r["value"] >= r["goal"] else "NOT met"
            note = f"goal >= {r['goal']} ({ok})"
        elif "limit" in r:
            note = (f"measured limit (t_cached + t_base_forward) / t_cached {r['limit']:.3f}; FLOP figure "
                    f"1 + F_base/F_step {r['flop_limit']:.3f}")
        else:
            note = ""
        lines.append(_row(name, f"{r['value']:.3f}", note))
    if probe := results.get("loader_probe"):
        lines.append("Loader alone (1 spawned worker, no compute; after its first batch)")
        for label, p in probe.items():
            lines.append(_row(label, f"{p['ms_per_batch']:.0f} ms/batch",
                              f"{p['batches_per_s']:.2f} batches/s over {p['batches']}; first batch "
                              f"{p['first_batch_s']:.1f} s (spawn + open); {_cpu_text(p['cpu_cores'])}"))
    lines.append("One step's parts (ms, median of 3, in this process)")
    for name, p in results["step_profile"].items():
        parts = {k: v for k, v in p.items() if k not in ("optimizer_step_ms", "overhead_ms")}
        lines.append(_row(name, f"{sum(parts.values()):.0f} ms",
                          "  ".join(f"{k.removesuffix('_ms')} {v:.0f}" for k, v in parts.items()) +
                          f"; whole optimizer_step {p['optimizer_step_ms']:.0f} (overhead {p['overhead_ms']:+.0f})"))
    e = results["extract"]
    lines.append(_row("extraction (setup)", f"{e['views'] / e['work_seconds']:.0f} views/s",
                      f"{e['views']} views, {e['stored_mb']:.1f} MB stored ({e['raw_mb']:.1f} MB raw)"))
    if u := results.get("s3_upload"):
        lines.append(_row("upload to moto (setup)", f"{u['mb_per_s']:.1f} MB/s", f"{u['objects']} objects"))
    if rt := results.get("run_train"):
        lines.append(_row("reference: run_train, 2 Ray workers", f"{rt['samples_per_s_last_window'] or 0:.1f} sam/s",
                          f"last log window of {rt['steps']} steps; {rt['wall_seconds_incl_startup']:.0f} s incl. "
                          f"Ray start; busy {rt['busy_cores']:.2f}"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="timed optimiser steps per variant run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (loader start-up, allocator)")
    p.add_argument("--order", default="c,a,b,d,c", help="variants to run, in order; repeats allowed")
    p.add_argument("--batch", type=int, default=64, help="global batch (one rank)")
    p.add_argument("--images", type=int, default=None,
                   help="Fashion-MNIST images in the cache (default: enough for one epoch of warm-up + steps)")
    p.add_argument("--views", type=int, default=2, help="views per image V in the cache")
    p.add_argument("--unit-size", type=int, default=64, help="images per extraction unit")
    p.add_argument("--img-size", type=int, default=32, help="view side S")
    p.add_argument("--patch-size", type=int, default=4, help="patch size (both models)")
    p.add_argument("--new-dim", type=int, default=128, help="new encoder width")
    p.add_argument("--new-depth", type=int, default=6, help="new encoder depth")
    p.add_argument("--new-heads", type=int, default=4, help="new encoder heads")
    p.add_argument("--base-dim", type=int, default=192, help="base model width")
    p.add_argument("--base-depth", type=int, default=6, help="base model depth")
    p.add_argument("--base-heads", type=int, default=6, help="base model heads")
    p.add_argument("--decoder-dim", type=int, default=128, help="D_dec")
    p.add_argument("--decoder-heads", type=int, default=4, help="decoder heads")
    p.add_argument("--k-max", type=int, default=15, help="attention rows kept (and topk used)")
    p.add_argument("--threads", type=int, default=1, help="torch compute threads")
    p.add_argument("--loader-workers", type=int, default=1, help="DataLoader workers (spawned)")
    p.add_argument("--extract-actors", type=int, default=2, help="run_extract actors (1 thread each)")
    p.add_argument("--probe-steps", type=int, default=12, help="batches of the loader-alone probe (0: skip)")
    p.add_argument("--run-train", action="store_true", help="also one end-to-end run_train with 2 Ray workers")
    p.add_argument("--train-steps", type=int, default=20, help="steps of the --run-train reference")
    common.add_output_args(p, "train")
    args = p.parse_args(argv)
    if args.images is None:
        need = (args.warmup + args.steps) * args.batch
        args.images = -(-need // args.unit_size) * args.unit_size
    return args


def main(argv: list[str] | None = None) -> int:
    return common.bench_main(parse_args(argv), run, render, default=str)


if __name__ == "__main__":
    raise SystemExit(main())
