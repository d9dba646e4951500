"""The one-command GPU check (benchmarks/gpu_check.sh) in its quick mode, end to end, so the script cannot rot."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]

# (section, dotted path of a number it must hold)
NUMBERS = {
    "pytest_gpu": ("rc", "passed", "failed", "errors", "skipped"),
    "tiny_pipeline": ("extract_s", "train_s", "export_s", "evaluate_s", "final.loss", "knn_top1", "linear_top1"),
    "extract_vitb": ("matmul_peak.tflops", "bare.views_per_s", "bare.mfu", "extract.views_per_s", "extract.mfu",
                     "extract.breakdown_ms_per_view.load", "ratio_extract_over_bare.value"),
    "train_vitb": ("variants.ram.samples_per_s", "variants.cached.samples_per_s", "variants.online.samples_per_s",
                   "base_forward_ms_per_batch", "ratios.cached_over_ram.value", "ratios.cached_over_online.value",
                   "ratios.cached_over_online.limit", "flops.F_step"),
    "loader_vitb": ("one_worker_cached.samples_per_s", "one_worker_cached.target_mb_decoded_per_s",
                    "one_worker_online.samples_per_s", "pixels_one_thread.views_built_per_s",
                    "many_workers_cached.samples_per_s", "workers_needed.for_ram_step_rate_cached"),
}


def _get(record: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        record = record[key]
    return record


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path: Path) -> None:
    """``gpu_check.sh OUTDIR --quick`` exits 0 within its budget, writes the JSON (every section with finite
    numbers, the machine named, Ray never imported) and the logs, and every printed number names the machine.
    This is also the suite's guard that the in-process pipeline (``extract.num_actors=0``, ``train.num_workers=0``:
    manifest, cache, training, export) never imports Ray, as on a GPU machine without it."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_WHEELS": str(tmp_path / "no-wheels"),
           "GPU_CHECK_TIMEOUT_S": "150"}
    t0 = time.perf_counter()
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--quick",
                           "--workdir", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=200)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < 120, f"the quick check took {seconds:.0f} s"
    report = json.loads((out / "gpu_check.json").read_text())
    machine = report["machine"]
    assert machine["device"] in ("cpu", *([machine["device"]] if machine["cuda"] else []))
    assert machine["torch"] and machine["label"] == f"{machine['device']} | torch {machine['torch']}"
    assert report["ray_imported"] is False
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    for name, paths in NUMBERS.items():
        section = report["sections"][name]
        allowed = ("ok", "failed") if name == "pytest_gpu" else ("ok",)  # a failing GPU test is recorded only
        assert section["status"] in allowed, (name, section.get("error"), section.get("traceback_tail"))
        for dotted in paths:
            value = _get(section, dotted)
            assert isinstance(value, int | float) and math.isfinite(value), (name, dotted, value)
    assert report["sections"]["pytest_gpu"]["summary"]
    assert report["sections"]["tiny_pipeline"]["train_device"] == ("cuda" if machine["cuda"] else "cpu")
    log_text = (out / "gpu_check.log").read_text()
    assert "loader_vitb: ok" in log_text
    assert (out / "gpu_check_console.log").stat().st_size > 0
    measured = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
                if re.match(r"^\[.*\] \((a|b|c|d|e)\) ", line)]
    assert len(measured) >= 10
    assert all(line.startswith(f"[{machine['label']}]") for line in measured)


def test_section_cap_keeps_partial_numbers(tmp_path: Path) -> None:
    """A section stopped by its cap is recorded as timed out with what it measured so far, in the JSON on disk;
    a failing one records its error, and the JSON is rewritten after each."""
    rep = gpu_check.Report(tmp_path, {"label": "cpu | torch x"}, {})

    def slow(out: dict[str, Any]) -> None:
        out["first"] = 1.5
        time.sleep(5)
        out["never"] = 2.0

    def broken(out: dict[str, Any]) -> None:
        raise ValueError("no such field: sizes.images")

    rep.run("slow", slow, cap=0.3)
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["slow"]
    assert on_disk["status"] == "timed_out" and on_disk["first"] == 1.5 and "never" not in on_disk
    assert on_disk["seconds"] < 2
    rep.run("broken", broken, cap=5)
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert on_disk["broken"]["status"] == "failed"
    assert "no such field: sizes.images" in on_disk["broken"]["error"]
    assert on_disk["slow"]["status"] == "timed_out"
