#!/usr/bin/env python
"""The Fashion-MNIST replication of TEC's claims (docs/replication.md), one run at a time, resumable.

    python experiments/replicate.py --config configs/fmnist_replication.yaml [--only NAME ...] [--table]

Every variant is the replication config plus overrides; each trained model is exported and evaluated with the same
k-NN (k=20, cosine) and L-BFGS linear probe on frozen cls features (``--n-train`` / ``--n-test`` images of the two
splits). Results append to ``<output_root>/replication/<name>/results.jsonl`` (a finished variant is skipped when
the script runs again) and ``--table`` prints them as the README's Markdown table.

Variants (the issue's a-d):
    base                   the pixel-MAE base (pre-trained here: ``base.pretrain``)
    tec, tec_seed1/2       TEC from the base's cache (V=4), three seeds (model init, sample order, masks)
    norm_channel/none      feature-target normalisation ablation (default ``patch``)
    no_attention(_seed1)   attention target off (two seeds)
    no_adapters            input and encoder adapters off
    views1, views16        views per image V=1 and 16 (V=4 is ``tec``)
    online                 the base model run every step on the views V=16 plans (no cache)
    mae_continued          the pixel-MAE base trained for base + TEC epochs (MAE at TEC's total budget)
    round2                 a second round: ``tec``'s export as the base
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra import storage
from infra.logs import setup_logging
from pipeline import config as C
from pipeline.commands import evaluate_cli
from pipeline.orchestrate import ensure_cache, prepare_base, prepare_manifest, train_from
from pipeline.registry import runs_root
from pipeline.run_logs import write_run_logs
from stages.train import run_train

log = logging.getLogger("replicate")

VARIANTS: dict[str, list[str]] = {
    "tec": [],
    "no_attention": ["model.attention_target=false"],
    "norm_channel": ["model.feature_norm=channel"],
    "norm_none": ["model.feature_norm=none"],
    "no_adapters": ["model.adapters=none"],
    "views1": ["extract.views_per_image=1"],
    "views16": ["extract.views_per_image=16"],
    "online": ["extract.views_per_image=16", "train.target_source=online"],
    "round2": [],  # base.checkpoint set to tec's export at run time
    "tec_seed1": ["train.seed=1"],
    "mae_continued": [],  # base.pretrain.epochs raised at run time
    "tec_seed2": ["train.seed=2"],
    "no_attention_seed1": ["model.attention_target=false", "train.seed=1"],
}
ORDER = ["base", *VARIANTS]


def _results_path(cfg: C.PipelineConfig) -> str:
    return storage.join(cfg.output_root, "replication", cfg.name, "results.jsonl")


def load_results(cfg: C.PipelineConfig) -> dict[str, dict[str, Any]]:
    """Finished variants by name (the last row of each)."""
    url = _results_path(cfg)
    if not storage.exists(url):
        return {}
    rows = [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]
    return {r["variant"]: r for r in rows}


def _append(cfg: C.PipelineConfig, row: dict[str, Any]) -> None:
    url = _results_path(cfg)
    old = storage.read_bytes(url) if storage.exists(url) else b""
    storage.write_bytes(url, old + (json.dumps(row, default=str) + "\n").encode())


def _evaluate(cfg: C.PipelineConfig, checkpoint: str, which: str, n_train: int, n_test: int) -> dict[str, Any]:
    ev = evaluate_cli(cfg, checkpoint, which=which, n_train=n_train, n_test=n_test)
    return {"knn_top1": ev["knn_top1"], "linear_top1": ev["linear_top1"], "eval_seconds": ev["seconds"]}


def _train_online(cfg: C.PipelineConfig, name: str) -> tuple[str | None, list[dict]]:
    """A run with the base model computing targets every step (no cache); returns (export, history)."""
    manifest_url, manifest_sha, _ = prepare_manifest(cfg)
    checkpoint = prepare_base(cfg, manifest_url, manifest_sha)
    job = C.to_train_job(cfg, cache_url=None, run_name=name, storage_path=runs_root(cfg.output_root),
                         manifest_url=manifest_url, checkpoint_url=checkpoint)
    result = run_train(job, address=cfg.ray.address)
    return result.export_path, write_run_logs(result.run_dir)


def run_variant(config: str, variant: str, n_train: int, n_test: int, done: dict[str, dict]) -> dict[str, Any]:
    """Train (or evaluate) one variant and return its results row."""
    overrides = list(VARIANTS.get(variant, []))
    base_cfg = C.load_config(config)
    if variant == "round2":
        if "tec" not in done:
            raise RuntimeError("round2 needs the 'tec' variant first (its export is the new base)")
        overrides += [f"base.checkpoint={done['tec']['export']}", f"base.arch={base_cfg.model.arch}",
                      f"base.timm_overrides={json.dumps(base_cfg.model.timm_overrides)}"]
    cfg = C.load_config(config, overrides)
    started = time.perf_counter()
    row: dict[str, Any] = {"variant": variant, "overrides": overrides}
    if variant in ("base", "mae_continued"):
        if variant == "mae_continued":
            p = cfg.base.pretrain
            cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, pretrain=dataclasses.replace(
                p, epochs=p.epochs + cfg.train.epochs)))
            row["overrides"] = [f"base.pretrain.epochs={cfg.base.pretrain.epochs}"]
        checkpoint = prepare_base(cfg)
        row.update(export=checkpoint, epochs=cfg.base.pretrain.epochs, train_seconds=time.perf_counter() - started)
        row.update(_evaluate(cfg, checkpoint, "base", n_train, n_test))
        return row
    name = f"{cfg.name}-{variant}"
    if cfg.train.target_source == "online":
        export, history = _train_online(cfg, name)
        extract_seconds = None
    else:
        cache = ensure_cache(cfg)
        extract_seconds = cache.extract.wall_seconds if cache.extract else None
        t0 = time.perf_counter()
        result = train_from(cfg, cache, run_name=name)
        export, history = result.export_path, write_run_logs(result.run_dir)
        started = t0
    last = history[-1] if history else {}
    row.update(export=export, epochs=cfg.train.epochs, steps=last.get("step"), final_loss=last.get("loss"),
               train_seconds=time.perf_counter() - started, extract_seconds=extract_seconds)
    row.update(_evaluate(cfg, export, "model", n_train, n_test))
    return row


def table(results: dict[str, dict[str, Any]]) -> str:
    """The README's Markdown table of finished variants, in the fixed order."""
    lines = ["| variant | overrides | epochs | k-NN top-1 | linear top-1 | train s | extract s |",
             "|---|---|---|---|---|---|---|"]
    for name in ORDER:
        if (r := results.get(name)) is None:
            continue
        ov = " ".join(f"`{o}`" for o in r["overrides"] if "checkpoint=" not in o) or "—"
        ex = f"{r['extract_seconds']:.0f}" if r.get("extract_seconds") else "—"
        lines.append(f"| {name} | {ov} | {r['epochs']} | {r['knn_top1']:.4f} | {r['linear_top1']:.4f} | "
                     f"{r['train_seconds']:.0f} | {ex} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fmnist_replication.yaml")
    p.add_argument("--only", nargs="*", choices=ORDER, help="variants to run (default: all, in order)")
    p.add_argument("--n-train", type=int, default=10000, help="train-split images for k-NN bank / linear probe")
    p.add_argument("--n-test", type=int, default=10000, help="test-split images evaluated")
    p.add_argument("--table", action="store_true", help="print the results table and exit")
    args = p.parse_args(argv)
    setup_logging()
    cfg = C.load_config(args.config)
    if args.table:
        print(table(load_results(cfg)))
        return 0
    for variant in args.only or ORDER:
        done = load_results(cfg)
        if variant in done:
            log.info("%s: done already (%s)", variant, _results_path(cfg))
            continue
        log.info("=== %s ===", variant)
        row = run_variant(args.config, variant, args.n_train, args.n_test, done)
        _append(cfg, row)
        log.info("%s: k-NN %.4f, linear %.4f", variant, row["knn_top1"], row["linear_top1"])
    print(table(load_results(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
