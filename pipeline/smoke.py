"""A smoke run through both stages: Fashion-MNIST → extract on Ray → TEC training on Ray Train from the cache → export.

The base model here is a randomly initialised tiny ViT (no pre-trained weights can be downloaded; the MAE
pre-training that makes a real base model is a later stage of the project), so the numbers show that the pieces
fit and the loss moves, not what TEC achieves.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import timm
import torch

from stages.extract import ExtractJob, run_extract
from stages.manifest import manifest_from_idx, write_manifest
from stages.train import run_train
from stages.train_job import TrainJob
from stages.views import Preprocess
from tec_model import build_vit, vit_kwargs

log = logging.getLogger(__name__)

FMNIST = Path(os.environ.get("TEC_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
BASE_ARCH, NEW_ARCH = "vit_mini_patch4_32", "vit_micro_patch4_32"


def _base_checkpoint(path: Path, kwargs: dict) -> None:
    torch.manual_seed(0)
    torch.save({"model": build_vit(kwargs).state_dict()}, path)


def run_smoke(out_dir: str = "outputs/smoke", epochs: int = 4, n_images: int = 512, batch_size: int = 64) -> dict:
    """Run the smoke pipeline and return its summary (also logged as a table).

    Args:
        out_dir: local folder for the manifest, checkpoint, cache and exported encoder.
        epochs: TEC training epochs from the cache (n_images / batch_size steps each).
        n_images: Fashion-MNIST training images used.
        batch_size: images per step.
    """
    images = FMNIST / "train-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"{images} not found: install Fashion-MNIST with `apt-get install "
                                "dataset-fashion-mnist` (or `make setup` as root), or set TEC_FASHION_MNIST_DIR")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_kw = vit_kwargs(BASE_ARCH, in_chans=1)
    write_manifest(manifest_from_idx(images, limit=n_images), str(out / "manifest.parquet"))
    _base_checkpoint(out / "base_random.pth", base_kw)
    pre = Preprocess.fashion_mnist(32, 1)
    job = ExtractJob(cache_url=str(out / "cache"), manifest_url=str(out / "manifest.parquet"),
                     checkpoint_url=str(out / "base_random.pth"), timm_kwargs=base_kw, preprocess=pre,
                     views_per_image=2, k_max=8, unit_size=64)
    extract = run_extract(job, num_actors=1, threads_per_actor=max(1, (os.cpu_count() or 2) - 1))

    train = TrainJob(
        run_name=time.strftime("smoke-%Y%m%d-%H%M%S"), storage_path=str(out / "runs"), cache_url=job.cache_url,
        timm_kwargs=vit_kwargs(NEW_ARCH, in_chans=1), base_timm_kwargs=base_kw, preprocess=pre.to_dict(),
        views_per_image=job.views_per_image, view_seed=job.view_seed, k_max=job.k_max, topk=8, att_tau=1.8,
        decoder_dim=128, decoder_heads=4, epochs=epochs, global_batch=batch_size, blr=1.5e-3, warmup_epochs=1,
        num_workers=2, loader_workers=1, checkpoint_every=10_000, log_every=5,
    )
    started = time.perf_counter()
    result = run_train(train)
    history = [json.loads(line) for line in Path(result.checkpoint_path, "metrics.jsonl").read_text().splitlines()]
    vit = timm.create_model(NEW_ARCH, num_classes=0, in_chans=1)
    vit.load_state_dict(torch.load(result.export_path, weights_only=True), strict=True)
    summary = {
        "views extracted": extract.views_written, "cache MB (stored)": round(extract.stored_bytes / 1e6, 2),
        "stored/raw": round(1 / extract.compression_ratio, 3) if extract.compression_ratio else None,
        "train steps": history[-1]["step"], "first logged loss": round(history[0]["loss"], 4),
        "last loss": round(history[-1]["loss"], 4), "train seconds (incl. Ray Train start)":
        round(time.perf_counter() - started, 1), "export (timm, strict load checked)": result.export_path,
    }
    width = max(map(len, summary))
    log.info("smoke summary:\n%s", "\n".join(f"  {k:<{width}}  {v}" for k, v in summary.items()))
    return summary
