"""A smoke run through everything that exists: Fashion-MNIST → extract on Ray → TEC steps from the cache → export.

The base model here is a randomly initialised tiny ViT (no pre-trained weights can be downloaded; the MAE
pre-training that makes a real base model is a later stage of the project), so the numbers show that the pieces
fit and the loss moves, not what TEC achieves.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import timm
import torch

from stages.cache import open_cache
from stages.extract import ExtractJob, run_extract
from stages.images import ImageSource
from stages.manifest import manifest_from_idx, read_manifest, write_manifest
from stages.views import Preprocess
from tec_model import TECModel, build_vit, export_encoder, vit_kwargs

log = logging.getLogger(__name__)

FMNIST = Path(os.environ.get("TEC_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
BASE_ARCH, NEW_ARCH = "vit_mini_patch4_32", "vit_micro_patch4_32"


def _base_checkpoint(path: Path, kwargs: dict) -> None:
    torch.manual_seed(0)
    torch.save({"model": build_vit(kwargs).state_dict()}, path)


def run_smoke(out_dir: str = "outputs/smoke", steps: int = 30, n_images: int = 512, batch_size: int = 64) -> dict:
    """Run the smoke pipeline and return its summary (also logged as a table).

    Args:
        out_dir: local folder for the manifest, checkpoint, cache and exported encoder.
        steps: TEC optimisation steps from the cache.
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

    cache = open_cache(job.cache_url)
    table, _ = read_manifest(job.manifest_url)
    uris, source = table.column("uri").to_pylist(), ImageSource(in_chans=1)
    model = TECModel(vit_kwargs(NEW_ARCH, in_chans=1), base_kw["embed_dim"], base_kw["num_heads"], 64, topk=8,
                     att_tau=1.8, decoder_dim=128, decoder_heads=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                            weight_decay=0.05)
    rng, losses, started = np.random.default_rng(0), [], time.perf_counter()
    for step in range(steps):
        idx = np.sort(rng.choice(n_images, batch_size, replace=False))
        view = step % job.views_per_image
        batch = cache.read_samples(idx, views=np.full(len(idx), view))
        pixels = torch.stack([pre.build(source.read(uris[i]), box) for i, box in zip(idx, batch.views, strict=True)])
        loss, parts, _ = model(pixels, torch.from_numpy(batch.features).float(),
                               torch.from_numpy(batch.attn_logits).float(), torch.from_numpy(batch.topk_index))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f (fea %.4f, att %.4f)", step + 1, steps, loss.item(),
                     parts["loss_fea"].item(), parts["loss_att"].item())

    exported = export_encoder(model)
    torch.save(exported, out / "encoder_timm.pth")
    vit = timm.create_model(NEW_ARCH, num_classes=0, in_chans=1)
    vit.load_state_dict(torch.load(out / "encoder_timm.pth", weights_only=True), strict=True)
    summary = {
        "views extracted": extract.views_written, "cache MB (stored)": round(extract.stored_bytes / 1e6, 2),
        "stored/raw": round(1 / extract.compression_ratio, 3) if extract.compression_ratio else None,
        "train steps": steps, "first loss": round(losses[0], 4), "last loss": round(losses[-1], 4),
        "train seconds": round(time.perf_counter() - started, 1), "export": str(out / "encoder_timm.pth"),
    }
    log.info("smoke summary:\n%s", "\n".join(f"  {k:<20} {v}" for k, v in summary.items()))
    return summary
