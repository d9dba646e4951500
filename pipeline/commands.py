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
                    k_max=cfg.extract.k_max, codec=cfg.extract.codec, new=C.model_timm_kwargs(cfg), tec=tec,
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
                                 source=ImageSource(pre.channels, policy=UriPolicy.of(cfg.data)),
                                 checkpoint_key=C.checkpoint_key_for(cfg, checkpoint, which)).to_dict()
        except CheckpointError as err:
            arch, other = (cfg.base.arch, "model") if which == "base" else (cfg.model.arch, "base")
            raise CheckpointError(f"{err}; --which {which} loads it as the config's {which}.arch {arch}: pass "
                                  f"--which {other} for a {other} checkpoint, or the config it was made with") from None
    results["protocols"] = list(wanted)
    for protocol in (p for p in wanted if p in E.FINETUNE_PROTOCOLS):
        results[protocol] = finetune_cli(cfg, checkpoint, which, protocol, data)
    return results


def inspect_base_cli(cfg: C.PipelineConfig, n_images: int = 64, seed: int = 0, n_knn: int = 1000,
                     margin: float | None = None, json_path: str | None = None) -> Any:
    """``inspect-base``: the base diagnostics of the config (:mod:`stages.extract.diagnostics`) on ``n_images``
    images (a seeded sample of the manifest, every planned view) at the config's ``model.att_tau`` and
    ``model.topk``, plus the base's k-NN top-1 when the data set is labelled, printed with any warning.

    k-NN: ``n_knn`` labelled images of the manifest (a seeded random sample, in random order), the first fifth held
    out as the test set, the rest as the train set; centre views, class-token features,
    :func:`pipeline.probes.knn_top1` (k = 20).

    Args:
        cfg: the pipeline config. n_images: images diagnosed. seed: the samples' seed. n_knn: images of the k-NN
            (0 skips it). margin: the near-uniform margin (default :data:`stages.extract.diagnostics.UNIFORM_MARGIN`).
        json_path: also write the summary there as JSON.

    Returns:
        The :class:`~stages.extract.diagnostics.BaseDiagnostics`.
    """
    import json

    import numpy as np
    import torch

    from infra import storage
    from pipeline import evaluate as E
    from pipeline.orchestrate import resolve_cache
    from pipeline.probes import knn_top1
    from stages.extract.diagnostics import UNIFORM_MARGIN, diagnose_base
    from stages.images import ImageSource
    from stages.manifest import read_manifest

    job = resolve_cache(cfg).job  # builds the manifest and resolves the base as extract does; writes no cache
    m = cfg.model
    diag = diagnose_base(job, n_images, seed=seed, taus=(m.att_tau,), topk=min(m.topk, job.k_max),
                         margin=UNIFORM_MARGIN if margin is None else margin)
    table = read_manifest(job.manifest_url)[0]
    picked = table.take(np.random.default_rng(seed).permutation(table.num_rows)[:max(0, n_knn)])
    if picked.num_rows >= 5 and picked.column("label").null_count == 0:
        model = E.load_encoder(job.checkpoint_url, job.timm_kwargs, job.checkpoint_key)
        feats = E.extract_features(model, picked, job.preprocess, source=ImageSource(
            job.preprocess.channels, policy=job.uri_policy))
        labels = torch.from_numpy(picked.column("label").to_numpy().astype(np.int64))
        n_test = max(1, picked.num_rows // 5)
        diag.knn_top1 = knn_top1(feats[n_test:], labels[n_test:], feats[:n_test], labels[:n_test],
                                 num_classes=int(labels.max()) + 1)
        diag.knn = {"n_train": picked.num_rows - n_test, "n_test": n_test, "k": 20, "feature": "cls"}
    else:
        log.info("inspect-base: no k-NN (%d images sampled, labels %s)", picked.num_rows,
                 "present" if picked.num_rows and not picked.column("label").null_count else "missing")
    print("\n".join(diag.summary_lines()))
    for warning in diag.warnings():
        print(f"WARNING: {warning}")
    if json_path:
        storage.write_bytes(json_path, json.dumps(diag.to_dict(), indent=2).encode())
        print(f"summary: {json_path}")
    return diag
