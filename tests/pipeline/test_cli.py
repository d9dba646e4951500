"""The CLI end to end on configs/tiny.yaml: run twice (cache reused), ledger, status, cost, export, secrets."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import run_pipeline
from pipeline.config import base_timm_kwargs, load_config
from pipeline.ledger import read_ledger
from pipeline.orchestrate import _extract_job
from stages.extract import UnitExtractor, prepare
from tec_model import build_vit

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
SECRET = "S3CR3T-MARKER-4711"
pytestmark = pytest.mark.usefixtures("ray_cluster", "fmnist_dir")


def cli(*argv: str) -> None:
    run_pipeline.main(["--log-level", "WARNING", *argv])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """``run`` twice on the tiny config into a fresh output root, with a secret in the env and in a URL."""
    root = tmp_path_factory.mktemp("cli_root")
    overrides = [f"output_root={root}", f"data.test_path=s3://user:{SECRET}@example.invalid/t10k.gz"]
    outputs, records, terminal = [], [], io.StringIO()
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda record: records.append(handler.format(record))
    root_logger, level = logging.getLogger(), logging.getLogger().level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)
    try:
        # what Ray prints of its workers' output lands on sys.stdout / sys.stderr
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(terminal), \
                contextlib.redirect_stdout(terminal):
            mp.setenv("AWS_SESSION_TOKEN", SECRET)
            mp.setenv("TEC_LOG_LEVEL", "INFO")  # the level Ray workers log at, whatever the CI sets (WARNING)
            # the first run trains on Ray Train, the second (which reuses the cache) in-process: the same code, half
            # the time. Both extract in-process and read in the training process (Ray actors and spawned loader
            # workers have tests of their own; here they would add process start-ups only).
            for extra in ([], ["train.num_workers=0"]):
                extra += ["extract.num_actors=0", "train.loader_workers=0"]
                run_pipeline.main(["--log-level", "INFO", "run", "--config", TINY, *overrides, *extra])
                runs = sorted((root / "runs").iterdir())
                outputs.append({"runs": [r.name for r in runs], "log": records, "terminal": terminal})
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
    return root, outputs


def test_second_run_reuses_the_cache_and_ledger_has_one_extraction_two_runs(two_runs):
    root, outputs = two_runs
    caches = [p for p in (root / "caches").iterdir()]
    assert len(caches) == 1 and len(outputs[1]["runs"]) == 2
    extractions, runs = read_ledger(str(caches[0]))
    assert extractions.num_rows == 1 and runs.num_rows == 2
    for run_dir in (root / "runs").iterdir():
        assert (run_dir / "export" / "encoder.pth").exists()
        assert (run_dir / "metrics.csv").read_text().startswith("step,")
        assert any((run_dir / "tensorboard").iterdir())
        assert "name: tiny" in (run_dir / "config.yaml").read_text()


def test_ledger_arithmetic_matches_an_independent_flop_count(two_runs):
    root, _ = two_runs
    cfg = load_config(TINY, [f"output_root={root}"])
    vit = build_vit(base_timm_kwargs(cfg)).eval()
    for block in vit.blocks:
        block.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vit.forward_features(torch.zeros(1, 1, 32, 32))
    macs_per_view = counter.get_total_flops() // 2
    extractions, runs = read_ledger(str(next((root / "caches").iterdir())))
    ext = extractions.to_pylist()[0]
    assert ext["views"] == 256 * 2 and ext["base_macs_total"] == 512 * macs_per_view
    for row in runs.to_pylist():
        assert row["views_served"] == 2 * (256 // 64) * 64  # 2 epochs × 4 steps × global batch 64
        assert row["base_macs_avoided"] == row["views_served"] * macs_per_view
        assert row["bytes_read"] > 0 and row["train_macs"] > 0


def test_status_cost_and_export_commands(two_runs, capsys, tmp_path):
    root, outputs = two_runs
    cli("status", "--root", str(root))
    out = capsys.readouterr().out
    assert "256  2" in out and "4/4" in out and outputs[1]["runs"][0] in out
    cli("cost", "--config", TINY, f"output_root={root}")
    out = capsys.readouterr().out
    assert "MACs (multiply-accumulates; FLOPs = 2×MACs)" in out and "break-even" in out and "reached" in out
    cli("export", "--run", str(root / "runs" / outputs[1]["runs"][0]), "--out", str(tmp_path / "exp"))
    assert (tmp_path / "exp" / "encoder.pth").exists()
    cli("cost", "--config", TINY, f"output_root={root}", "--project", "--images", "1281167", "--epochs", "300")
    assert "storage" in capsys.readouterr().out.lower()


def test_secrets_never_written(two_runs):
    root, _ = two_runs
    leaks = [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, f"secret written to {leaks}"
    attrs = json.loads((next((root / "caches").iterdir()) / "zarr.json").read_text())["attributes"]
    assert attrs["tec_config"]["data"]["test_path"] == "s3://example.invalid/t10k.gz"  # userinfo stripped
    log_text = "\n".join(two_runs[1][-1]["log"])
    assert "reusing complete cache" in log_text  # the capture works: the second run logged its reuse
    assert SECRET not in log_text


def test_terminal_at_info_shows_the_stages_progress_and_none_of_rays_reports(two_runs):
    """At INFO the workers' own lines arrive as records (naming the worker); Ray Train's reports do not."""
    log, printed = two_runs[1][-1]["log"], two_runs[1][-1]["terminal"].getvalue()
    assert any("extract: units 4/4" in r for r in log)  # the driver's extraction progress
    assert any(r.startswith("(RayTrainWorker pid=") and "step" in r for r in log)  # a Ray Train worker's progress
    assert not [r for r in log if "TrainingReport(" in r or "Reporting training result" in r]
    assert "TrainingReport(" not in printed and "Setting up process group" not in printed


def test_status_shows_a_half_finished_extraction(tmp_path, capsys):
    cfg = load_config(TINY, [f"output_root={tmp_path}"])
    job, _ = _extract_job(cfg, None)
    spec, _ = prepare(job)
    UnitExtractor(job, spec, device="cpu", threads=1).run_unit(1)
    cli("status", "--root", str(tmp_path))
    assert "1/4 (partial)" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "key"), [
    ("train.epochs=three", "train.epochs"),
    ("model.topkk=3", "model.topkk"),
    ("model.topk=99", "model.topk"),
    ("model.mask_ratio=1.0", "model.mask_ratio"),
])
def test_bad_config_fails_before_any_work_naming_the_key(override, key, tmp_path, caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        cli("run", "--config", TINY, f"output_root={tmp_path}", override)
    assert exit_info.value.code == 2 and key in caplog.text
    assert not any(tmp_path.iterdir()), "work started despite a bad config"


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x..y"])
def test_bad_run_name_fails_before_any_work_naming_the_option(name, tmp_path, caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        cli("train", "--config", TINY, f"output_root={tmp_path}", "--run-name", name)
    assert exit_info.value.code == 2 and "--run-name: " in caplog.text and "directory name" in caplog.text
    assert not any(tmp_path.iterdir()), "work started despite a bad run name"


def test_cli_prints_and_logs_urls_without_their_secrets(tmp_path, capsys, caplog):
    """What the CLI prints and every record its logging set-up handles lose URL secrets (the filter)."""
    url = f"https://user:{SECRET}@example.invalid/base.pth?X-Amz-Signature={SECRET}&X-Amz-Expires=60"
    with caplog.at_level(logging.INFO):
        cli("pretrain", "--config", TINY, f"output_root={tmp_path}", f"base.checkpoint={url}")  # returns it as is
        printed = capsys.readouterr().out
        logging.getLogger("pipeline.test").warning("reading %s failed", url)
        try:
            raise OSError(f"cannot open {url}")
        except OSError:
            logging.getLogger("pipeline.test").exception("with a traceback")
    assert printed.strip() == "https://example.invalid/base.pth?X-Amz-Signature=<redacted>&X-Amz-Expires=60"
    assert "reading https://example.invalid/base.pth?X-Amz-Signature=<redacted>" in caplog.text
    assert "OSError: cannot open https://example.invalid" in caplog.text and SECRET not in caplog.text
