#!/usr/bin/env python
"""tec-pipeline command line: a thin layer over ``stages/`` and ``pipeline/``.

    python run_pipeline.py manifest --idx /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz --out m.parquet
    python run_pipeline.py extract --manifest m.parquet --checkpoint base.pth --arch vit_micro_patch4_32 \\
        --in-chans 1 --norm fashion_mnist --cache outputs/caches/demo
    python run_pipeline.py smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("run_pipeline")


def _add_manifest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifest", help="build a Parquet manifest of a data set",
                       description="Build a Parquet manifest (index, uri, label, size) from one data source.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--idx", help="IDX images file (e.g. Fashion-MNIST train-images-idx3-ubyte.gz)")
    src.add_argument("--image-folder", help="ImageFolder root: root/<class>/<image>")
    src.add_argument("--uri-list", help="Parquet or CSV file with a 'uri' column (and optional 'label')")
    p.add_argument("--limit", type=int, default=None, help="IDX only: keep the first N records")
    p.add_argument("--out", required=True, help="where to write the manifest (local path or fsspec URL)")


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="run the base model once and write the target cache",
                       description="Stage 1: extract base-model targets for V views per image into a Zarr cache. "
                                   "Re-running skips complete units; a different config against the same cache "
                                   "is refused with the differing fields named.")
    p.add_argument("--manifest", required=True, help="Parquet manifest URL (see the 'manifest' command)")
    p.add_argument("--checkpoint", required=True, help="base-model checkpoint URL (MAE/DINO/iBOT/timm/TEC)")
    p.add_argument("--checkpoint-key", default=None, help="force a checkpoint entry, e.g. teacher or student")
    p.add_argument("--arch", required=True, help="base architecture name, e.g. vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=None, help="override the architecture's input size")
    p.add_argument("--in-chans", type=int, default=None, help="override input channels (1 for grey data)")
    p.add_argument("--cache", required=True, help="target cache URL (local path or s3://bucket/prefix)")
    p.add_argument("--views", type=int, default=2, help="views per image V (default 2)")
    p.add_argument("--seed", type=int, default=0, help="view-plan seed (default 0)")
    p.add_argument("--k-max", type=int, default=15, help="attention rows kept besides cls (default 15)")
    p.add_argument("--last-layers", type=int, default=2, help="blocks averaged for features (default 2)")
    p.add_argument("--norm", choices=["imagenet", "fashion_mnist"], default="imagenet",
                   help="mean/std of the view normalisation (default imagenet)")
    p.add_argument("--unit-size", type=int, default=64, help="images per work unit / shard (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="views per base-model forward (default 64)")
    p.add_argument("--num-actors", type=int, default=1, help="Ray actors (one GPU each when GPUs exist)")
    p.add_argument("--threads-per-actor", type=int, default=1, help="torch threads per CPU actor (default 1)")
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or local)")
    p.add_argument("--summary-json", default=None, help="also write the run summary as JSON here")


def cmd_manifest(args: argparse.Namespace) -> None:
    from stages import manifest

    if args.idx:
        table = manifest.manifest_from_idx(args.idx, limit=args.limit)
    elif args.image_folder:
        table = manifest.manifest_from_image_folder(args.image_folder)
    else:
        table = manifest.manifest_from_uri_list(args.uri_list)
    sha = manifest.write_manifest(table, args.out)
    print(f"{args.out}: {table.num_rows} rows, sha256 {sha}")


def cmd_extract(args: argparse.Namespace) -> None:
    from stages.extract import ExtractJob, run_extract
    from stages.views import Preprocess
    from tec_model import vit_kwargs

    overrides = {k: v for k, v in {"img_size": args.img_size, "in_chans": args.in_chans}.items() if v is not None}
    kwargs = vit_kwargs(args.arch, **overrides)
    pre = (Preprocess.fashion_mnist(kwargs["img_size"], kwargs["in_chans"]) if args.norm == "fashion_mnist"
           else Preprocess(kwargs["img_size"]) if kwargs["in_chans"] == 3
           else sys.exit("--norm imagenet needs 3 input channels; use --norm fashion_mnist for grey data"))
    job = ExtractJob(cache_url=args.cache, manifest_url=args.manifest, checkpoint_url=args.checkpoint,
                     checkpoint_key=args.checkpoint_key, timm_kwargs=kwargs, preprocess=pre,
                     views_per_image=args.views, view_seed=args.seed, k_max=args.k_max, last_layers=args.last_layers,
                     unit_size=args.unit_size, batch_size=args.batch_size)
    result = run_extract(job, num_actors=args.num_actors, address=args.address,
                         threads_per_actor=args.threads_per_actor)
    if args.summary_json:
        from infra import storage

        storage.write_bytes(args.summary_json, json.dumps(result.__dict__, indent=2, default=list).encode())


def cmd_train(args: argparse.Namespace) -> None:
    from infra import storage
    from stages.train import run_train
    from stages.train_job import TrainJob

    job = TrainJob.from_dict(json.loads(storage.read_bytes(args.job)))
    result = run_train(job, address=args.address)
    print(json.dumps({"run_dir": result.run_dir, "export": result.export_path, "metrics": result.metrics}, indent=2,
                     default=str))


def cmd_smoke(args: argparse.Namespace) -> None:
    from pipeline.smoke import run_smoke

    run_smoke(out_dir=args.out, epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_pipeline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING or ERROR; "
                                                          "also $TEC_LOG_LEVEL")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_manifest(sub)
    _add_extract(sub)
    p = sub.add_parser("train", help="train TEC from a target cache (or online) on Ray Train",
                       description="Stage 2: train the new encoder. Starting the same run (name and storage) "
                                   "again resumes it from its latest checkpoint.")
    p.add_argument("--job", required=True, help="JSON file with the TrainJob fields (see stages/train_job.py)")
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or local)")
    p = sub.add_parser("smoke", help="smoke-run both stages on 512 Fashion-MNIST images",
                       description="Manifest, a random tiny base model, extraction on Ray, TEC training on Ray "
                                   "Train from the cache, export, and a strict timm load of the export.")
    p.add_argument("--out", default="outputs/smoke", help="where to write the exported encoder")
    p.add_argument("--epochs", type=int, default=4, help="training epochs over the 512 images (default 4)")
    return parser


COMMANDS = {"manifest": cmd_manifest, "extract": cmd_extract, "train": cmd_train, "smoke": cmd_smoke}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from infra.logs import setup_logging

    setup_logging(args.log_level)
    COMMANDS[args.command](args)


if __name__ == "__main__":
    main()
