"""configs/imagenet_vitb_mae.yaml at real model sizes on CPU: an MAE ViT-B/16 checkpoint in MAE's own layout and an
ImageNet-layout folder of mixed images, through ``run_pipeline.py run`` (extract → train one epoch → export).

Only the amount of work is cut down (12 images, one view each, global batch 4, one epoch = 2 steps); the base and
new models are full ViT-B/16s at 224 px with the config's 512-wide decoder.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import run_pipeline
from stages.cache import open_cache
from stages.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "imagenet_vitb_mae.yaml")
# How each stage runs: both in this process, without Ray. With Ray instead (1 actor, 1 Train worker, 2 CPUs):
# ["extract.num_actors=1", "extract.threads_per_actor=2", "train.num_workers=1", "train.threads_per_worker=2",
#  "ray.num_cpus=2"] and the ``ray_cluster`` fixture.
STAGE_MODES = ["extract.num_actors=0", "train.num_workers=0", "train.threads_per_worker=2"]
CPU_SIZES = ["extract.views_per_image=1", "extract.unit_size=8", "extract.batch_size=4", "train.use_gpu=false",
             "train.global_batch=4", "train.accum_steps=1", "train.epochs=1", "train.warmup_epochs=0",
             "train.loader_workers=0", "train.checkpoint_every=1000", "train.keep_checkpoints=1", "train.log_every=1"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vitb_run(mae_vitb_checkpoint: Path, imagenet_folder: tuple[Path, dict[str, Path]],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The CLI's ``run`` on the ViT-B config: its printed summary plus ``wall_s``. The output root (a ViT-B
    checkpoint with AdamW state is ~1.4 GB) is deleted afterwards."""
    root, _ = imagenet_folder
    out = tmp_path_factory.mktemp("vitb_root")
    overrides = [f"data.path={root}", "data.test_path=null", f"output_root={out}",
                 f"base.checkpoint={mae_vitb_checkpoint}", *CPU_SIZES, *STAGE_MODES]
    started, threads = time.perf_counter(), torch.get_num_threads()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run_pipeline.main(["--log-level", "WARNING", "run", "--config", CONFIG, *overrides])
    finally:
        torch.set_num_threads(threads)  # the in-process trainer sets train.threads_per_worker
    summary = json.loads(printed.getvalue())
    summary["wall_s"] = time.perf_counter() - started
    yield summary
    shutil.rmtree(out, ignore_errors=True)


def test_run_completes_and_the_export_loads_strictly_into_timm_vit_base(vitb_run):
    assert vitb_run["export"] and vitb_run["final"]["step"] == 2, vitb_run
    assert torch.isfinite(torch.tensor(vitb_run["final"]["loss"]))
    state = torch.load(vitb_run["export"], map_location="cpu", weights_only=True)
    vit = timm.create_model("vit_base_patch16_224", num_classes=0)
    vit.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = vit(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 768) and torch.isfinite(out).all()
    run_dir = Path(vitb_run["run_dir"])
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 1  # only the final one (~1.4 GB)
    print(f"ViT-B run: {vitb_run['wall_s']:.0f} s")


def test_failures_table_names_only_the_truncated_jpeg(vitb_run, imagenet_folder):
    _, files = imagenet_folder
    cache = open_cache(vitb_run["cache"])
    failures = cache.failures().to_pylist()
    assert [(Path(f["uri"].removeprefix("file://")), f["reason"]) for f in failures] == \
        [(files["truncated"], "truncated")]
    uris, _ = read_manifest(cache.spec.manifest_uri)
    paths = [Path(u.removeprefix("file://")) for u in uris.column("uri").to_pylist()]
    assert sorted(paths) == sorted(files.values())
    # CMYK JPEG, RGBA PNG and 16-bit grey PNG are converted and kept
    assert [p for p, ok in zip(paths, cache.valid(), strict=True) if not ok] == [files["truncated"]]


def test_the_folder_holds_the_awkward_modes(imagenet_folder):
    _, files = imagenet_folder
    modes = {kind: Image.open(files[kind]).mode for kind in ("cmyk", "rgba", "grey16")}
    assert modes == {"cmyk": "CMYK", "rgba": "RGBA", "grey16": "I;16"}
