"""Benchmark of the cache's target codecs (``extract.codec``) at ViT-B/16 shapes, on real images.

For each codec (``float16``, the lossless default, and the quantised ``int8`` / ``fp8``), on the same targets:

(a) stored bytes per view: uncompressed (as laid out: :func:`stages.cache.codecs.stored_bytes_per_view`) and after
    Blosc, as the cache stores it (a real local cache written with ``TargetCache.write_unit``, its ``summary()``),
    against raw float16;
(b) reconstruction error of what a reader gets back (``read_unit``) against the float16 targets: features after patch
    normalisation (relative error, worst per-token cosine) and the attention target distribution, KL of
    softmax(logits / τ) per row, for τ = 1.0, 1.4, 1.8 (the configs' ``att_tau``);
(c) encode and decode speed of the codec math alone (``codecs.encode_all`` / ``decode_all`` on one unit), in MB/s
    of float16 targets (features + attention), at ``--threads`` torch threads (1: one loader worker).

The targets: ``--images`` Fashion-MNIST images, one 224 px view each, through a RANDOMLY INITIALISED ViT-B/16
(grey input: 196 patches × 768, 12 heads, k_max 15 as configs/base/imagenet.yaml). A random base has no trained
feature statistics (no outlier channels, flatter attention), so the errors are what these tensors give, not a
measurement on a trained MAE/iBOT base. ``--from-cache URL`` measures a trained base instead: the targets are the
first ``--images`` valid images (all their views) of an existing lossless cache, e.g. the one replication v2
extracts from its 64-epoch base, re-encoded exactly as extraction encodes them (from the float16 targets).

Run ``.venv/bin/python benchmarks/bench_codecs.py --help``; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stages.cache import CacheSpec, codecs, create_or_open, open_cache, raw_bytes_per_view
from stages.extract import ExtractJob
from stages.extract.job import build_spec
from stages.images import ImageSource
from stages.views import Preprocess
from tec_model import BaseModel, vit_kwargs

try:  # as ``python -m benchmarks.bench_codecs`` or as a script (then benchmarks/ is sys.path[0])
    from benchmarks import common
except ImportError:  # pragma: no cover
    import common  # type: ignore[no-redef]

TAUS = (1.0, 1.4, 1.8)


def real_targets(args: argparse.Namespace, job: ExtractJob) -> tuple[np.ndarray, ...]:
    """float16 targets of one view per image: features (n, 1, L, C), attn_logits (n, 1, K+1, H, L), topk, boxes."""
    source, model = ImageSource(in_chans=1), BaseModel(job.timm_kwargs, last_layers=2, k_max=args.k_max)
    boxes, pixels = [], []
    for index in range(args.images):
        image = source.read(f"idx://{args.idx.resolve()}#{index}")
        boxes.append(job.preprocess.plan(0, index, 0, *image.shape[:2]))
        pixels.append(job.preprocess.build(image, boxes[-1]))
    feats, attn, topk = [], [], []
    previous = torch.get_num_threads()
    torch.set_num_threads(args.forward_threads)
    with torch.no_grad():
        for batch in torch.stack(pixels).split(16):
            out = model(batch)
            feats.append(out.features.half().numpy())
            attn.append(out.attn_logits.half().numpy())
            topk.append(out.topk_index.to(torch.int16).numpy())
    torch.set_num_threads(previous)
    return (np.concatenate(feats)[:, None], np.concatenate(attn)[:, None], np.concatenate(topk)[:, None],
            np.stack(boxes).astype(np.int32)[:, None])


def cached_targets(url: str, images: int) -> tuple[CacheSpec, tuple[np.ndarray, ...]]:
    """The lossless spec and float16 targets of the first ``images`` valid images of the cache at ``url``.

    Returns:
        ``(spec, (features (n, V, L, C), attn_logits (n, V, K+1, H, L), topk_index (n, V, K), views (n, V, 5)))``,
        with ``spec.n_images == n``.
    """
    cache = open_cache(url)
    if cache.spec.codec != codecs.LOSSLESS:
        raise SystemExit(f"--from-cache {url}: a {codecs.LOSSLESS} cache is needed (it has codec "
                         f"{cache.spec.codec!r}), since the codecs are measured against its float16 targets")
    parts: list[Any] = []
    for unit in cache.complete_units():
        batch = cache.read_unit(unit)
        parts.append(batch)
        if sum(int(b.valid.sum()) for b in parts) >= images:
            break
    if not parts:
        raise SystemExit(f"--from-cache {url}: the cache has no complete unit")
    keep = [np.concatenate([getattr(b, name)[b.valid] for b in parts])[:images]
            for name in ("features", "attn_logits", "topk_index", "views")]
    return cache.spec.replace(n_images=len(keep[0])), tuple(keep)


def _rate(fn: Callable[[], Any], nbytes: int, repeats: int) -> float:
    """MB/s of ``fn`` over ``nbytes``, median of ``repeats`` timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e6


def measure_codec(codec: str, args: argparse.Namespace, lossless: CacheSpec,
                  targets: tuple[np.ndarray, ...]) -> dict:
    """Bytes, errors and speeds of ``codec`` on ``targets`` (float16, as :func:`cached_targets` returns them)."""
    features, attn, topk, boxes = targets
    spec = lossless.replace(codec=codec)
    url = str(args.workdir / f"cache_{codec}")
    cache = create_or_open(url, spec)
    for unit in range(cache.n_units):
        rows = cache.unit_range(unit)
        sel = slice(rows.start, rows.stop)
        cache.write_unit(unit, features[sel], attn[sel], topk[sel], boxes[sel], np.ones(len(rows), bool))
    summary = cache.summary()
    got = [cache.read_unit(u) for u in range(cache.n_units)]
    got_f = np.concatenate([b.features for b in got])
    got_a = np.concatenate([b.attn_logits for b in got])
    unit = {"features": features[:args.unit_size], "attn_logits": attn[:args.unit_size]}
    stored = codecs.encode_all(codec, unit)
    nbytes = sum(a.nbytes for a in unit.values())
    record = {
        "codec": codec, "format_version": spec.format_version,
        "raw_float16_bytes_per_view": raw_bytes_per_view(spec),
        "stored_bytes_per_view_uncompressed": codecs.stored_bytes_per_view(
            codec, spec.num_patches, spec.embed_dim, spec.num_heads, spec.k_max),
        "stored_bytes_per_view_blosc": summary.stored_bytes_per_view,
        "features": codecs.feature_error(features, got_f),
        "attention_kl": {str(tau): codecs.attention_kl(attn, got_a, tau) for tau in TAUS},
        "encode_mb_per_s": _rate(lambda: codecs.encode_all(codec, unit), nbytes, args.repeats),
        "decode_mb_per_s": _rate(lambda: codecs.decode_all(codec, stored), nbytes, args.repeats),
    }
    return record


def random_vitb_targets(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[CacheSpec, tuple]:
    """The lossless spec and float16 targets of ``args.images`` views through a random ViT-B/16."""
    kwargs = vit_kwargs("vit_base_patch16_224", in_chans=1)
    manifest_url, checkpoint_url = common.write_manifest_and_checkpoint(args.workdir, args.idx, args.images, kwargs)
    job = ExtractJob(cache_url="", manifest_url=manifest_url, checkpoint_url=checkpoint_url, timm_kwargs=kwargs,
                     preprocess=Preprocess.fashion_mnist(224, 1), views_per_image=1, k_max=args.k_max,
                     unit_size=args.unit_size)
    say(f"forward of {args.images} views through a random ViT-B/16 ...")
    targets = real_targets(args, job)
    return build_spec(job, "0" * 64, args.images, hashlib.sha256(b"random").hexdigest()), targets


def run(args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    start = time.perf_counter()
    if args.from_cache:
        say(f"reading {args.images} images' float16 targets from {args.from_cache} ...")
        lossless, targets = cached_targets(args.from_cache, args.images)
    else:
        lossless, targets = random_vitb_targets(args, say)
    out: dict[str, Any] = {"config": common.config_of(args), "forward_seconds": time.perf_counter() - start,
                           "targets": {"from_cache": args.from_cache or None, "images": len(targets[0]),
                                       "views_per_image": lossless.views_per_image,
                                       "timm_kwargs": lossless.timm_kwargs, "k_max": lossless.k_max},
                           "codecs": []}
    for codec in codecs.CODECS:
        say(f"codec {codec} ...")
        out["codecs"].append(measure_codec(codec, args, lossless, targets))
    return out


def render(results: dict) -> str:
    """The codec table (one row per codec); float16 has no codec math (stored as given, read as stored)."""
    base = results["codecs"][0]["raw_float16_bytes_per_view"]
    lines = ["| codec | stored B/view, uncompressed | after Blosc | ÷ raw float16 | features rel. error (patch "
             "norm) | worst token cosine | attention KL mean / max, τ = " + " | τ = ".join(map(str, TAUS))
             + " | encode MB/s | decode MB/s |", "|---|---|---|---|---|---|" + "---|" * len(TAUS) + "---|---|"]
    for r in results["codecs"]:
        kl = " | ".join(f"{r['attention_kl'][str(t)]['mean']:.1e} / {r['attention_kl'][str(t)]['max']:.1e}"
                        for t in TAUS)
        speed = ("— | —" if r["codec"] == codecs.LOSSLESS
                 else f"{r['encode_mb_per_s']:,.0f} | {r['decode_mb_per_s']:,.0f}")
        lines.append(
            f"| {r['codec']} | {r['stored_bytes_per_view_uncompressed']:,} | "
            f"{r['stored_bytes_per_view_blosc']:,.0f} | {r['stored_bytes_per_view_blosc'] / base:.3f} | "
            f"{r['features']['relative']:.4f} | {r['features']['cosine_min']:.5f} | {kl} | {speed} |")
    cfg, src = results["config"], results["targets"]
    origin = (f"from the lossless cache {src['from_cache']}" if src["from_cache"]
              else "through a random ViT-B/16")
    lines.append(f"  raw float16 targets: {base:,} B per view; {src['images']} images x {src['views_per_image']} "
                 f"view(s) {origin}; codec math on one unit at {cfg['threads']} torch thread(s), MB/s of float16 "
                 f"targets; targets made in {results['forward_seconds']:.0f} s")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_int_options(p, {
        "images": (128, "Fashion-MNIST images, one view each"),
        "unit-size": (64, "images per unit (the speed rows time one unit)"),
        "k-max": (15, "attention rows besides cls (configs/base/imagenet.yaml)"),
        "repeats": (5, "timed encode/decode calls per codec (median)"),
        "threads": (1, "torch threads of the codec math (1: one loader worker)"),
        "forward-threads": (2, "torch threads of the ViT-B forward")})
    p.add_argument("--from-cache", default="", metavar="URL",
                   help="measure on the targets of this lossless cache (a trained base) instead of a random ViT-B/16")
    common.add_output_args(p, "codecs")
    return common.bench_main(p.parse_args(), run, render)


if __name__ == "__main__":
    raise SystemExit(main())
