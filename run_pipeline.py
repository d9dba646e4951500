#!/usr/bin/env python
"""tec-pipeline: extract base-model targets once, train TEC from them many times.

Every job command takes ``--config FILE.yaml`` (see configs/; defaults when omitted) and ``key.sub=value``
overrides, e.g.  ``python run_pipeline.py run --config configs/tiny.yaml train.epochs=3 model.topk=4``.
Everything is written under ``output_root`` (default ./outputs): manifests, base checkpoints, caches, runs.
URLs are printed and logged without their secrets (userinfo, presigned signatures and tokens).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("run_pipeline")


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (configs/*.yaml); defaults when omitted")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides with dotted keys, values as YAML (train.epochs=3, base.checkpoint=null)")


def _config(args: argparse.Namespace):
    from pipeline.config import load_config

    address = [f"ray.address={json.dumps(args.address)}"] if args.address else []  # quoted: YAML reads 1:30 as 90
    return load_config(args.config, [*args.overrides, *address])


def _show(text: str) -> None:
    """Print ``text`` with every URL secret redacted."""
    from infra.redaction import redact_text

    print(redact_text(text))


def _print(obj: object) -> None:
    _show(json.dumps(obj, indent=2, default=str))


def cmd_manifest(args: argparse.Namespace) -> None:
    from stages import manifest

    if args.idx:
        table = manifest.manifest_from_idx(args.idx, limit=args.limit)
    elif args.image_folder:
        table = manifest.manifest_from_image_folder(args.image_folder)
    else:
        table = manifest.manifest_from_uri_list(args.uri_list)
    _show(f"{args.out}: {table.num_rows} rows, sha256 {manifest.write_manifest(table, args.out)}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from pipeline.orchestrate import prepare_base

    _show(prepare_base(_config(args)))


def cmd_extract(args: argparse.Namespace) -> None:
    from pipeline.orchestrate import ensure_cache

    ready = ensure_cache(_config(args), cache_url=args.cache)
    r = ready.extract
    _print({"cache": ready.url, "key": ready.spec.key, "reused": ready.reused,
            **({"units_written": len(r.units_written), "units_skipped": len(r.units_skipped),
                "views_written": r.views_written, "failures": r.failures, "stored_bytes": r.stored_bytes,
                "raw_over_stored": r.compression_ratio} if r else {})})


def cmd_train(args: argparse.Namespace) -> None:
    from pipeline.config import check_name
    from pipeline.orchestrate import locate_cache, train_from

    cfg = _config(args)
    if args.run_name is not None:
        check_name(args.run_name, "--run-name")
    result = train_from(cfg, locate_cache(cfg, cache_url=args.cache), run_name=args.run_name)
    _print({"run_dir": result.run_dir, "export": result.export_path, "metrics": result.metrics})


def cmd_run(args: argparse.Namespace) -> None:
    from pipeline.orchestrate import run

    _print(run(_config(args)))


def cmd_export(args: argparse.Namespace) -> None:
    from pipeline.orchestrate import export_run

    _show(export_run(args.run, args.out))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from infra.redaction import redact_text
    from pipeline.commands import evaluate_cli
    from pipeline.evaluate import format_results

    results = evaluate_cli(_config(args), args.checkpoint, which=args.which, n_train=args.n_train,
                           n_test=args.n_test, protocols=args.protocols, num_classes=args.num_classes)
    _print(results)
    print(redact_text(format_results(results)), file=sys.stderr)  # for people; stdout stays one JSON document


def cmd_cost(args: argparse.Namespace) -> None:
    from pipeline.commands import cost_cli

    cost_cli(args)


def cmd_inspect_base(args: argparse.Namespace) -> None:
    from pipeline.commands import inspect_base_cli

    inspect_base_cli(_config(args), n_images=args.n_images, seed=args.seed, n_knn=args.n_knn, margin=args.margin,
                     json_path=args.json)


def cmd_status(args: argparse.Namespace) -> None:
    from pipeline.commands import print_status

    print_status(args.root or _config(args).output_root)


def cmd_demo(args: argparse.Namespace) -> None:
    from pipeline.demo import run_demo

    run_demo(args.config or "configs/demo.yaml", args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_pipeline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=None,
                        help="DEBUG, INFO, WARNING or ERROR (default INFO; WARNING when $CI is set; $TEC_LOG_LEVEL)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to run on (host:port, ray://host:10001 or auto); sets ray.address. Default "
                             "$RAY_ADDRESS (set inside `ray job submit` jobs), else a local Ray is started")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="stage 0: pre-train the base model as a pixel MAE (base.pretrain)",
                       description="Pre-train (or reuse, or resume) the pixel-MAE base model of this config when "
                                   "base.checkpoint is null; prints its MAE-format checkpoint URL. extract and run "
                                   "do this themselves when needed.")
    _job_args(p)

    p = sub.add_parser("extract", help="stage 1: run the base model once, write (or finish) the target cache",
                       description="Extract base-model targets for V views per image into the cache of this "
                                   "config (<output_root>/caches/<key>), or --cache. Complete units are skipped; a "
                                   "cache made with other settings is refused, naming the fields.")
    _job_args(p)
    p.add_argument("--cache", default=None, help="cache URL instead of the registry location")

    p = sub.add_parser("train", help="stage 2: train TEC from this config's (complete) cache",
                       description="Train the new encoder on Ray Train from the cache of this config. A run with "
                                   "the same name resumes from its latest checkpoint.")
    _job_args(p)
    p.add_argument("--cache", default=None, help="cache URL instead of the registry location")
    p.add_argument("--run-name", default=None, help="run name (default train.run_name or <name>-<timestamp>)")

    p = sub.add_parser("run", help="extract (or reuse a matching cache), then train",
                       description="The two stages in one command; an existing complete cache with the same key "
                                   "is reused instead of extracting again.")
    _job_args(p)

    p = sub.add_parser("export", help="export a run's encoder (latest checkpoint) as a timm state dict")
    p.add_argument("--run", required=True, help="run directory (<output_root>/runs/<name>)")
    p.add_argument("--out", default=None, help="output folder (default <run>/export)")

    p = sub.add_parser("evaluate", help="k-NN and linear-probe top-1 of an encoder on the test split",
                       description="Top-1 of a checkpoint on data.test_path, trained on data.path, for any data.source "
                                   "(IDX files, ImageFolder train/val trees, labelled URI lists). Prints the results "
                                   "as JSON on stdout and as a table on stderr.")
    _job_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint URL: a TEC export, a base model, a timm file")
    p.add_argument("--which", choices=["model", "base"], default="model",
                   help="architecture of the checkpoint: the config's new model (default) or its base")
    p.add_argument("--n-train", type=int, default=None, help="train-split images for k-NN/probe (default 10000)")
    p.add_argument("--n-test", type=int, default=None, help="test-split images (default 2000)")
    p.add_argument("--protocols", default="knn,linear",
                   help="comma list of knn, linear (frozen features) and finetune, peft_prompt, peft_both "
                        "(where this build has pipeline.finetune); default knn,linear")
    p.add_argument("--num-classes", type=int, default=None,
                   help="expected class count; an error when the data disagrees (default: the data's)")

    p = sub.add_parser("cost", help="FLOPs ledger report of a cache, or a projection on paper",
                       description="Per cache: extraction spent, runs, base MACs avoided, net saving, bytes read "
                                   "per MAC saved, break-even; writes a PNG chart. --project: storage, extraction "
                                   "device-hours, bandwidth and saving for a configuration on paper. "
                                   "Counts are MACs (1 MAC = 2 FLOPs).")
    _job_args(p)
    p.add_argument("--cache", default=None, help="cache URL (default: every cache under output_root)")
    p.add_argument("--chart", default=None, help="PNG path for the chart (default <cache>/ledger/cost.png)")
    p.add_argument("--project", action="store_true", help="project the config on paper instead")
    p.add_argument("--images", type=int, default=None, help="--project: data set size (default: the config's)")
    p.add_argument("--epochs", type=float, default=None, help="--project: epochs per run (default: the config's)")
    p.add_argument("--runs", type=int, default=1, help="--project: training runs sharing the cache")
    p.add_argument("--step-rate", type=float, default=1000.0, help="--project: views/s per training worker")
    p.add_argument("--device-tflops", type=float, default=300.0,
                   help="--project: sustained device TFLOP/s (2 FLOPs per MAC)")
    p.add_argument("--price", type=float, default=2.0, help="--project: device price per hour")

    p = sub.add_parser("inspect-base", help="know the base before paying for it: its targets on sampled views",
                       description="Run the base model on every planned view of a sample of the images and report "
                                   "the attention target's entropy at model.att_tau against uniform, the top-k "
                                   "stability across views, feature statistics after patch norm and (labelled data) "
                                   "the base's k-NN top-1; warns when the attention target is near uniform. Writes "
                                   "no cache (the manifest and a missing base are prepared as extract would).")
    _job_args(p)
    p.add_argument("--n-images", type=int, default=64, help="images diagnosed (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image samples (default 0)")
    p.add_argument("--n-knn", type=int, default=1000, help="labelled images for the k-NN, a fifth held out (0: none)")
    p.add_argument("--margin", type=float, default=None,
                   help="warn when the attention entropy is within this fraction of uniform (default 0.03)")
    p.add_argument("--json", default=None, help="also write the summary as JSON to this path")

    p = sub.add_parser("status", help="list caches (completion, size) and runs (progress, checkpoints)")
    _job_args(p)
    p.add_argument("--root", default=None, help="output root (default: the config's output_root)")

    p = sub.add_parser("demo", help="the Fashion-MNIST demo end to end (configs/demo.yaml)")
    _job_args(p)

    p = sub.add_parser("manifest", help="build a Parquet manifest of a data set",
                       description="Build a Parquet manifest (index, uri, label, size) from one data source.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--idx", help="IDX images file (e.g. Fashion-MNIST train-images-idx3-ubyte.gz)")
    src.add_argument("--image-folder", help="ImageFolder root: root/<class>/<image>")
    src.add_argument("--uri-list", help="Parquet or CSV file with a 'uri' column (and optional 'label')")
    p.add_argument("--limit", type=int, default=None, help="IDX only: keep the first N records")
    p.add_argument("--out", required=True, help="where to write the manifest (local path or fsspec URL)")
    return parser


COMMANDS = {"pretrain": cmd_pretrain, "extract": cmd_extract, "train": cmd_train, "run": cmd_run, "export": cmd_export,
            "evaluate": cmd_evaluate, "cost": cmd_cost, "inspect-base": cmd_inspect_base,
            "status": cmd_status, "demo": cmd_demo,
            "manifest": cmd_manifest}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from infra.logs import setup_logging
    from infra.redaction import install_log_redaction

    setup_logging(args.log_level)
    install_log_redaction()
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)


if __name__ == "__main__":
    main()
