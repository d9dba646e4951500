"""pipeline.orchestrate: the cache key is the hand-off; ``train`` finds its cache without resolving it again."""

from __future__ import annotations

from pathlib import Path

import pytest

import run_pipeline
from infra import storage
from pipeline import orchestrate as O
from pipeline.config import load_config
from stages import manifest as M
from tec_model import BaseModel

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
pytestmark = pytest.mark.usefixtures("fmnist_dir")
# in-process stages, 64 images: 2 units, 2 steps
SMALL = ["data.limit=64", "train.epochs=1", "extract.unit_size=32", "extract.batch_size=32", "train.global_batch=32",
         "extract.num_actors=0", "train.num_workers=0", "train.loader_workers=0"]


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"train called {what}")
    return refused


def test_train_without_a_recorded_cache_is_refused_naming_what_to_run(tmp_path):
    cfg = load_config(TINY, [f"output_root={tmp_path}", *SMALL])
    with pytest.raises(FileNotFoundError, match=r"run `run_pipeline.py extract` \(or `run`\) with this configuration"):
        O.locate_cache(cfg)
    assert not any(tmp_path.iterdir()), "locating a cache wrote something (a manifest, a base)"


def test_train_reads_neither_the_base_nor_the_manifest_builder(tmp_path, monkeypatch):
    """``extract`` records the request's cache key; ``train`` then finds the cache with every manifest builder,
    the base resolution and every read of the base checkpoint made to fail, and rewrites no manifest."""
    overrides = [f"output_root={tmp_path}", *SMALL]
    run_pipeline.main(["--log-level", "WARNING", "extract", "--config", TINY, *overrides])
    bases = {str(p) for p in (tmp_path / "bases").rglob("*") if p.is_file()}
    manifests = {p: p.stat().st_mtime_ns for p in (tmp_path / "manifests").iterdir()}
    assert bases and manifests
    for name in ("manifest_from_idx", "manifest_from_image_folder", "manifest_from_uri_list", "manifest_to_bytes"):
        monkeypatch.setattr(M, name, _refuse(f"stages.manifest.{name}"))
    for name in ("prepare_manifest", "prepare_base", "pretrain_base", "resolve_cache"):
        monkeypatch.setattr(O, name, _refuse(f"pipeline.orchestrate.{name}"))
    monkeypatch.setattr(BaseModel, "from_checkpoint", _refuse("BaseModel.from_checkpoint"))
    read = storage.read_bytes

    def read_bytes(url, *args, **kwargs):
        if str(url).removeprefix("file://") in bases:
            raise AssertionError(f"train read the base checkpoint {url}")
        return read(url, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    run_pipeline.main(["--log-level", "WARNING", "train", "--config", TINY, *overrides, "--run-name", "found"])
    assert (tmp_path / "runs" / "found" / "export" / "encoder.pth").exists()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "manifests").iterdir()} == manifests
    # another request (other images) has no recorded cache, though the registry holds one
    with pytest.raises(FileNotFoundError, match="no target cache recorded for this configuration"):
        O.locate_cache(load_config(TINY, [*overrides, "data.limit=32"]))
