"""What a crash or a careless restart must not lose: a run restarted with another configuration is refused before
its files are touched, default run names do not collide, and an extraction's ledger row lost in a crash between the
last unit and the row is derived again from the completion markers (once). The pipeline runs in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra import storage
from pipeline import config as C
from pipeline import ledger
from pipeline import orchestrate as O
from pipeline.cost import cache_costs
from stages.train.rundir import RunConfigChangedError

REPO = Path(__file__).resolve().parents[2]


def tiny_config(root: Path, fmnist_dir: Path, *more: str) -> C.PipelineConfig:
    """configs/tiny.yaml on 64 images (4 units of 16), in-process extraction and training, 2 steps."""
    return C.load_config(REPO / "configs" / "tiny.yaml", [
        f"output_root={root}", f"data.path={fmnist_dir / 'train-images-idx3-ubyte.gz'}", "data.limit=64",
        "extract.num_actors=0", "extract.unit_size=16", "extract.batch_size=16", "train.num_workers=0",
        "train.loader_workers=0", "train.epochs=1", "train.global_batch=32", *more])


class CrashError(RuntimeError):
    """Stands for the process dying between the last unit and the ledger row."""


@pytest.mark.faults
def test_an_extraction_row_lost_in_a_crash_is_derived_from_the_markers_once(fmnist_dir, tmp_path, monkeypatch,
                                                                           record_figures):
    cfg = tiny_config(tmp_path, fmnist_dir)
    seen = {}

    def crash(cache_url, result, spec):
        seen.update(url=cache_url, result=result, spec=spec)
        raise CrashError("killed before the ledger row")

    monkeypatch.setattr(ledger, "record_extraction", crash)
    with pytest.raises(CrashError):
        O.ensure_cache(cfg)
    monkeypatch.undo()
    url, result = seen["url"], seen["result"]
    assert len(result.units_written) == 4 and ledger.read_ledger(url)[0].num_rows == 0

    again = O.ensure_cache(cfg)  # the cache is complete: reused, and its row derived
    assert again.reused and again.url == url
    ext, _ = ledger.read_ledger(url)
    assert ext.num_rows == 1, ext.to_pylist()
    row = ext.to_pylist()[0]
    assert row["recovered"] and json.loads(row["units_json"]) == [0, 1, 2, 3]
    assert (row["images"], row["views"]) == (result.images_written, result.views_written)
    assert row["base_macs_total"] == result.views_written * row["base_macs_per_view"] > 0
    assert row["bytes_written"] == row["cache_stored_bytes"] == result.stored_bytes
    assert json.loads(row["device_seconds_json"]).keys() == result.device_seconds.keys()
    objects = sorted(storage.list_objects(ledger.ledger_url(url)))

    O.ensure_cache(cfg)  # idempotent: nothing new
    rerun = sorted(storage.list_objects(ledger.ledger_url(url)))
    assert rerun == objects
    # the run's own row arriving late supersedes the derived one: no unit is counted twice
    ledger.record_extraction(url, result, seen["spec"])
    ext, _ = ledger.read_ledger(url)
    assert ext.num_rows == 1 and not ext.to_pylist()[0]["recovered"]
    assert cache_costs(url)["views_extracted"] == result.views_written
    record_figures(section="refusal", kind="a crash between the last unit and the ledger row",
                   outcome="row derived from the completion markers", units_in_row=len(json.loads(row["units_json"])),
                   views_in_row=row["views"], ledger_objects_after_rerun=len(rerun),
                   new_ledger_objects_on_rerun=len(set(rerun) - set(objects)), rows_after_late_row=ext.num_rows,
                   lost=len(result.units_written) - len(json.loads(row["units_json"])))


@pytest.mark.faults
def test_a_changed_configuration_is_refused_before_the_run_is_overwritten(fmnist_dir, tmp_path, record_figures):
    cfg = tiny_config(tmp_path, fmnist_dir)
    cache = O.ensure_cache(cfg)
    result = O.train_from(cfg, cache, run_name="kept")
    run = Path(result.run_dir)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert {Path("config.yaml"), Path("config.json")} <= before.keys()

    changed = tiny_config(tmp_path, fmnist_dir, "train.blr=3e-3", "model.mask_ratio=0.5")
    with pytest.raises(RunConfigChangedError, match=r"(?s)blr: run has 0\.0015, now 0\.003.*mask_ratio") as info:
        O.train_from(changed, cache, run_name="kept")
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    changed_files = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
    assert after == before, f"the refused start changed {changed_files}"
    record_figures(section="refusal", kind="a run started again with a changed configuration",
                   outcome=f"`{type(info.value).__name__}`", fields_named=str(info.value).count(": run has "),
                   files_kept=len(before) - len(changed_files), bytes_kept=sum(len(d) for d in before.values()),
                   files_changed=len(changed_files), lost=len(changed_files))


@pytest.mark.faults
def test_default_run_names_do_not_collide_within_a_second(fmnist_dir, tmp_path, record_figures):
    cfg = tiny_config(tmp_path, fmnist_dir)
    drawn = [C.default_run_name(cfg, now=1_700_000_000) for _ in range(50)]
    names = set(drawn)
    assert len(names) == 50, sorted(names)[:5]
    record_figures(section="refusal", kind="default run names drawn within one second",
                   outcome="no collision", names_drawn=len(drawn), distinct=len(names),
                   collisions=len(drawn) - len(names), lost=len(drawn) - len(names))
