"""What the CLI's reporting commands print: ``status``, ``cost`` and ``evaluate`` (the jobs are in orchestrate)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pipeline import config as C
from pipeline.registry import list_caches, list_runs

log = logging.getLogger(__name__)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def status_text(root: str) -> str:
    """Caches (key, base model, N, V, stored size, complete units) and runs (progress, last checkpoint)."""
    caches = [[c.key[:16], c.base_arch, c.n_images, c.views_per_image, f"{c.stored_bytes / 1e6:.1f} MB",
               f"{c.units_complete}/{c.units_total}" + ("" if c.units_complete == c.units_total else " (partial)")]
              for c in list_caches(root)]
    runs = [[r.name, r.step, None if r.epoch is None else f"{r.epoch:.2f}",
             None if r.loss is None else f"{r.loss:.4f}", r.checkpoints, r.last_checkpoint,
             "yes" if r.exported else "no"] for r in list_runs(root)]
    return "\n".join([
        f"output root: {root}", "", "caches:",
        _table(caches, ["key", "base model", "N", "V", "stored", "units"]) if caches else "  (none)", "", "runs:",
        _table(runs, ["run", "step", "epoch", "loss", "ckpts", "last checkpoint", "exported"]) if runs else "  (none)",
    ])


def print_status(root: str) -> None:
    print(status_text(root))


def cost_cli(args: Any) -> None:
    """``cost``: the ledger report of one cache (or every cache under output_root) and its chart, or ``--project``."""
    from infra import storage
    from pipeline.cost import cost_table, format_projection, project, write_cost_chart
    from pipeline.orchestrate import prepare_manifest

    cfg = C.load_config(args.config, args.overrides)
    if args.project:
        if not args.images and not storage.exists(cfg.data.path):
            raise FileNotFoundError(
                f"cost --project counts the images of data.path, and {cfg.data.path} does not exist: pass --images N "
                f"(the data set's size, e.g. --images 1281167 for ImageNet-1k train) or data.path=<your data>")
        n_images = args.images or prepare_manifest(cfg)[2]
        m = cfg.model
        tec = {"mask_ratio": m.mask_ratio, "adapters": m.adapters, "attention_target": m.attention_target,
               "topk": m.topk, "decoder_dim": m.decoder_dim, "decoder_depth": m.decoder_depth,
               "decoder_heads": m.decoder_heads}
        p = project(n_images, C.base_timm_kwargs(cfg), views_per_image=cfg.extract.views_per_image,
                    epochs=args.epochs if args.epochs is not None else cfg.train.epochs, runs=args.runs,
                    k_max=cfg.extract.k_max, new=C.model_timm_kwargs(cfg), tec=tec,
                    step_rate_views_per_s_per_worker=args.step_rate,
                    device_macs_per_s=args.device_tflops * 1e12 / 2, device_price_per_hour=args.price,
                    local_cache_max_bytes=cfg.train.local_cache.max_bytes)
        print(format_projection(p))
        return
    urls = [args.cache] if args.cache else [c.url for c in list_caches(cfg.output_root)]
    if not urls:
        print(f"no caches under {cfg.output_root}")
        return
    print(cost_table(urls))
    for url in urls:
        chart = args.chart if (args.chart and len(urls) == 1) else storage.join(url, "ledger", "cost.png")
        print(f"chart: {write_cost_chart(url, chart)}")


def evaluate_cli(cfg: C.PipelineConfig, checkpoint: str, which: str = "model", n_train: int | None = None,
                 n_test: int | None = None, protocols: str | Sequence[str] = "knn,linear",
                 num_classes: int | None = None) -> dict[str, Any]:
    """Top-1 of ``checkpoint`` on the config's labelled splits (any ``data.source``; docs/pipeline.md#evaluate).

    Args:
        cfg: the pipeline config (data source, ``data.path`` / ``data.test_path``, input policy, preprocessing,
            architectures).
        checkpoint: any supported checkpoint URL (TEC export, base model, timm state dict).
        which: ``model`` (the config's new model architecture) or ``base``.
        n_train / n_test: images of each split (None: the evaluator's defaults).
        protocols: ``knn`` and ``linear`` (frozen features), ``finetune``, ``peft_prompt``, ``peft_both``
            (``pipeline.finetune``, where this build has it; results under the protocol's key).
        num_classes: the expected class count (None: the data's).

    Returns:
        The :class:`pipeline.evaluate.EvalResult` fields, ``protocols``, and one entry per fine-tuning protocol.
    """
    from pipeline import evaluate as E
    from pipeline.labelled import labelled_splits
    from stages.images import ImageSource
    from stages.uri_policy import UriPolicy
    from tec_model import CheckpointError

    wanted = E.parse_protocols(protocols)
    finetune_cli = E.finetune_entry(wanted)  # refuses unavailable protocols before any work
    data = labelled_splits(cfg, E.DEMO_N_TRAIN if n_train is None else n_train,
                           E.DEMO_N_TEST if n_test is None else n_test, num_classes)
    frozen = [p for p in wanted if p in E.FROZEN_PROTOCOLS]
    results: dict[str, Any] = {"knn_top1": None, "linear_top1": None, "n_train": data.train.num_rows,
                               "n_test": data.test.num_rows, "num_classes": data.num_classes, "data": data.source_desc}
    if frozen:
        kwargs = C.base_timm_kwargs(cfg) if which == "base" else C.model_timm_kwargs(cfg)
        pre = C.preprocess(cfg)
        try:
            results = E.evaluate(checkpoint, kwargs, data, preprocess=pre, protocols=frozen,
                                 source=ImageSource(pre.channels, policy=UriPolicy.of(cfg.data))).to_dict()
        except CheckpointError as err:
            arch, other = (cfg.base.arch, "model") if which == "base" else (cfg.model.arch, "base")
            raise CheckpointError(f"{err}; --which {which} loads it as the config's {which}.arch {arch}: pass "
                                  f"--which {other} for a {other} checkpoint, or the config it was made with") from None
    results["protocols"] = list(wanted)
    for protocol in (p for p in wanted if p in E.FINETUNE_PROTOCOLS):
        results[protocol] = finetune_cli(cfg, checkpoint, which, protocol, data)
    return results
