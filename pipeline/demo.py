"""The demo behind ``make demo``: Fashion-MNIST → base model → extract → TEC train from the cache → evaluate → cost.

Writes a results table (printed and ``<run>/demo/results.json``) and PNGs (``loss.png``, ``cost.png``) into
``<run>/demo/``.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from infra import storage
from pipeline import config as C
from pipeline.commands import evaluate_cli
from pipeline.cost import cost_table, write_cost_chart
from pipeline.orchestrate import ensure_cache, train_from
from pipeline.run_logs import read_history

log = logging.getLogger(__name__)
EVAL_TRAIN, EVAL_TEST = 5000, 1000  # first n of each Fashion-MNIST split: keeps the demo within minutes on 2 cores


def loss_chart_png(history: list[dict], title: str) -> bytes:
    """PNG of the total, feature and attention losses against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = [r["step"] for r in history]
    for key, label in (("loss", "total"), ("loss_fea", "feature (masked MSE)"), ("loss_att", "attention (soft CE)")):
        ax.plot(steps, [r[key] for r in history], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run_demo(config_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the demo end to end and return (and print) its results table."""
    started = time.perf_counter()
    cfg = C.load_config(config_path, overrides)
    cache = ensure_cache(cfg)
    result = train_from(cfg, cache)
    out = storage.join(result.run_dir, "demo")
    history = read_history(result.run_dir)
    storage.write_bytes(storage.join(out, "loss.png"), loss_chart_png(history, f"TEC training ({cfg.name})"))
    write_cost_chart(cache.url, storage.join(out, "cost.png"))
    sizes = {"n_train": EVAL_TRAIN, "n_test": EVAL_TEST}
    evaluations = {
        "base model": evaluate_cli(cfg, cache.spec.checkpoint, which="base", **sizes),
        "TEC model": evaluate_cli(cfg, result.export_path, which="model", **sizes),
    }
    results = {
        "cache": cache.url, "cache reused": cache.reused, "run": result.run_dir,
        "train steps": history[-1]["step"] if history else 0,
        "final loss": history[-1]["loss"] if history else None,
        "evaluation (top-1)": evaluations, "cost": cost_table(cache.url),
        "wall seconds": round(time.perf_counter() - started, 1),
    }
    storage.write_bytes(storage.join(out, "results.json"), json.dumps(results, indent=2, default=str).encode())
    lines = [f"{'':<12}{'k-NN top-1':>12}{'linear top-1':>14}"]
    for name, ev in evaluations.items():
        lines.append(f"{name:<12}{ev['knn_top1']:>12.4f}{ev['linear_top1']:>14.4f}")
    print("\n".join(["", "TEC demo results", *lines, f"run: {result.run_dir}", f"figures: {out}/*.png",
                     f"wall time: {results['wall seconds']} s"]))
    return results
