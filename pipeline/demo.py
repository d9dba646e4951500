"""The demo behind the README's main command: Fashion-MNIST → pixel-MAE base → extract → TEC from the cache →
evaluate base and new model → cost report.

Writes into ``<run>/demo/``: ``results.json`` (also printed as a table), ``loss.png`` (base pre-training and TEC
training losses), ``cost.png`` (the cache's ledger) and ``attention.png`` (cls-token attention of base vs new model
on a few test images, the paper's Fig. 2 in small).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from infra import storage
from pipeline import config as C
from pipeline.commands import evaluate_cli
from pipeline.cost import cost_table, write_cost_chart
from pipeline.evaluate import load_encoder
from pipeline.figures import attention_maps_png, loss_chart_png
from pipeline.orchestrate import ensure_cache, train_from
from pipeline.run_logs import read_history
from stages.manifest import read_idx

log = logging.getLogger(__name__)
EVAL_TRAIN, EVAL_TEST = 5000, 1000  # first n of each Fashion-MNIST split: keeps the demo within minutes on 2 cores
ATTENTION_IMAGES = 8


def _base_history(checkpoint_url: str) -> list[dict]:
    """The pre-training history of a base made by ``base.pretrain`` (``<run>/export/mae.pth``), else []."""
    if not checkpoint_url.endswith("/export/mae.pth"):
        return []
    return read_history(checkpoint_url.rsplit("/export/", 1)[0])


def run_demo(config_path: str, overrides: Sequence[str] = (), n_train: int = EVAL_TRAIN,
             n_test: int = EVAL_TEST) -> dict[str, Any]:
    """Run the demo end to end and return (and print) its results table.

    Args:
        config_path: the pipeline config (``configs/demo.yaml``).
        overrides: ``key=value`` config overrides.
        n_train / n_test: images of each split used by the k-NN / linear-probe evaluation.
    """
    started = time.perf_counter()
    cfg = C.load_config(config_path, overrides)
    if cfg.data.source != "idx" or not cfg.data.test_path:
        raise ValueError("the demo needs data.source 'idx' with data.test_path (labelled train/test splits)")
    cache = ensure_cache(cfg)  # pre-trains the base first when base.checkpoint is null
    base_url = cache.spec.checkpoint
    result = train_from(cfg, cache)
    out = storage.join(result.run_dir, "demo")
    history = read_history(result.run_dir)
    charts = {f"base pre-training ({cfg.base.arch})": _base_history(base_url)} if _base_history(base_url) else {}
    charts[f"TEC training ({cfg.model.arch})"] = history
    storage.write_bytes(storage.join(out, "loss.png"), loss_chart_png(charts))
    write_cost_chart(cache.url, storage.join(out, "cost.png"))
    images = read_idx(cfg.data.test_path, expected_ndim=3)[:ATTENTION_IMAGES]
    models = {"base": load_encoder(base_url, C.base_timm_kwargs(cfg)),
              "TEC": load_encoder(result.export_path, C.model_timm_kwargs(cfg))}
    storage.write_bytes(storage.join(out, "attention.png"), attention_maps_png(list(images), C.preprocess(cfg), models))
    sizes = {"n_train": n_train, "n_test": n_test}
    evaluations = {
        "base model": evaluate_cli(cfg, base_url, which="base", **sizes),
        "TEC model": evaluate_cli(cfg, result.export_path, which="model", **sizes),
    }
    results = {
        "cache": cache.url, "cache reused": cache.reused, "base checkpoint": base_url, "run": result.run_dir,
        "train steps": history[-1]["step"] if history else 0,
        "final loss": history[-1]["loss"] if history else None,
        "evaluation (top-1)": evaluations, "cost": cost_table(cache.url),
        "figures": [storage.join(out, f) for f in ("loss.png", "cost.png", "attention.png")],
        "wall seconds": round(time.perf_counter() - started, 1),
    }
    storage.write_bytes(storage.join(out, "results.json"), json.dumps(results, indent=2, default=str).encode())
    lines = [f"{'':<12}{'k-NN top-1':>12}{'linear top-1':>14}"]
    for name, ev in evaluations.items():
        lines.append(f"{name:<12}{ev['knn_top1']:>12.4f}{ev['linear_top1']:>14.4f}")
    print("\n".join(["", f"TEC demo results ({n_train} train / {n_test} test images)", *lines,
                     f"run: {result.run_dir}", f"figures: {out}/{{loss,cost,attention}}.png",
                     f"wall time: {results['wall seconds']} s"]))
    return results
