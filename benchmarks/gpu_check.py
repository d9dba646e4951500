"""One GPU check of the whole project, sized to a short device session (``benchmarks/gpu_check.sh OUTDIR``).

Sections, each under its own time cap and all under one overall budget; ``gpu_check.json`` is rewritten after every
section (and a section's partial numbers are kept when its cap stops it):

(a) ``pytest_gpu``: ``python -m pytest -m gpu tests/gpu -q``; pass/fail counts and the output's tail (a failure is
    recorded, the check goes on);
(b) ``tiny_pipeline``: ``configs/tiny.yaml`` end to end in this process (``extract.num_actors=0``,
    ``train.num_workers=0``, ``train.use_gpu`` on CUDA): the two calls of ``pipeline.orchestrate.run`` timed apart,
    ``export_run`` on the run, then ``evaluate_cli`` (the ``evaluate`` command) on the export: k-NN / linear top-1;
(c) ``extract_vitb``: ViT-B/16 at 224, bare batched forward vs ``run_extract`` in-process (reading, views, writing
    the cache), views/s and MFU against the measured matmul peak of the extraction precision;
(d) ``train_vitb``: ViT-B/16 TEC steps with targets in RAM vs from the local cache vs from the online base;
(e) ``loader_vitb``: the loader alone at the ViT-B shapes, and how many loader workers the step rates need.

``--quick`` runs the same code with tiny shapes (pico ViTs) on whatever device there is, in about a minute on two CPU
cores; ``tests/benchmarks/test_gpu_check.py`` runs it. Every printed number names the machine and torch version.
Ray is never imported (the check records whether it was). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # as ``python -m benchmarks.gpu_check`` or as a script (then benchmarks/ is sys.path[0])
    from benchmarks import gpu_check_vitb as vitb
except ImportError:  # pragma: no cover
    import gpu_check_vitb as vitb  # type: ignore[no-redef]

log = logging.getLogger("gpu_check")

ROOT = Path(__file__).resolve().parent.parent
FMNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"), ROOT / "outputs" / "gpu_data" / "fashion-mnist")
TRAIN_IDX, TEST_IDX = "train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"
SECTIONS = ("pytest_gpu", "tiny_pipeline", "extract_vitb", "train_vitb", "loader_vitb")
# (full, quick) time caps in seconds; the overall budget cuts the later ones short when earlier ones ran long
CAPS = {"pytest_gpu": (80, 40), "tiny_pipeline": (75, 60), "extract_vitb": (90, 30), "train_vitb": (130, 40),
        "loader_vitb": (50, 30)}


class SectionTimeoutError(Exception):
    """A section ran past its time cap."""


def machine_info() -> dict[str, Any]:
    """Device, torch/CUDA versions, cores: what every number of this run was measured on."""
    cuda = torch.cuda.is_available()
    info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "hostname": platform.node()}
    if cuda:
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    info["label"] = f"{info['device']} | torch {info['torch']}"
    return info


class Report:
    """The results of one run: ``gpu_check.json`` rewritten after every section, progress lines on stderr."""

    def __init__(self, out_dir: Path, info: dict[str, Any], config: dict[str, Any]) -> None:
        self.path = out_dir / "gpu_check.json"
        self.data: dict[str, Any] = {"machine": info, "config": config, "sections": {}}
        self.label = info["label"]
        self.started = time.perf_counter()

    def say(self, line: str) -> None:
        """One measured line, naming the machine (to stderr and the log)."""
        log.info("[%s] %s", self.label, line)

    def save(self) -> None:
        self.data["ray_imported"] = "ray" in sys.modules
        self.data["elapsed_s"] = time.perf_counter() - self.started
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)

    def run(self, name: str, fn: Callable[[dict[str, Any]], None], cap: float) -> None:
        """Run one section under ``cap`` seconds; record its status, time, numbers and any error."""
        out: dict[str, Any] = {"status": "running", "cap_s": cap}
        self.data["sections"][name] = out
        self.save()
        t0 = time.perf_counter()
        try:
            with alarm(cap):
                fn(out)
            out["status"] = out.get("status_override", "ok")
        except SectionTimeoutError:
            out["status"] = "timed_out"
            self.say(f"{name}: stopped at its cap of {cap:.0f} s (partial numbers kept)")
        except Exception as err:  # recorded; the other sections still run
            out["status"] = "failed"
            out["error"] = f"{type(err).__name__}: {err}"
            out["traceback_tail"] = traceback.format_exc()[-3000:]
            log.error("%s failed: %s", name, out["error"])
        out.pop("status_override", None)
        out["seconds"] = time.perf_counter() - t0
        self.say(f"{name}: {out['status']} in {out['seconds']:.1f} s")
        self.save()


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeoutError` in the main thread after ``seconds`` (SIGALRM)."""

    def fire(signum: int, frame: Any) -> None:
        raise SectionTimeoutError

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------ (a)
def section_pytest(rep: Report, cap: float, out: dict[str, Any]) -> None:
    """(a) ``pytest -m gpu tests/gpu`` in a child process (killed 5 s before the section's cap)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider"]
    out["command"] = " ".join(cmd[1:])
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(cap - 5, 1))
        text, out["rc"] = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        text, out["rc"] = ((err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")), -9
        out["status_override"] = "timed_out"
    counts = {k: 0 for k in ("passed", "failed", "errors", "skipped", "deselected")}
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", tail):
        counts["errors" if word.startswith("error") else word] = int(number)
    out.update(counts, all_passed=out["rc"] == 0, summary=tail, output_tail=text[-4000:])
    if out["rc"] not in (0, 1) and "status_override" not in out:
        out["status_override"] = "failed"  # collection/usage error or no tests found (rc 2-5)
    rep.say(f"(a) pytest -m gpu: rc {out['rc']}, {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['errors']} errors, {counts['skipped']} skipped — {tail}")


# ------------------------------------------------------------------------------------------------ (b)
def synthetic_fmnist(root: Path, n_train: int = 2048, n_test: int = 512) -> Path:
    """Labelled IDX files in Fashion-MNIST's names (28×28, 10 classes of stripe patterns with noise), for a
    machine without the data set; returns the directory."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        angle = labels[:, None, None] * np.pi / 10
        wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * (0.4 + 0.05 * labels[:, None, None]))
        images = np.clip(127 + 90 * wave + rng.normal(0, 25, (n, 28, 28)), 0, 255).astype(np.uint8)
        header = np.array([0x803, n, 28, 28], ">u4").tobytes()
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes(), 1))
        header = np.array([0x801, n], ">u4").tobytes()
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes(), 1))
    return root


def fmnist_dir(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """The Fashion-MNIST directory to use and what it is (given, found, or synthetic)."""
    if args.fmnist_dir is not None:
        return args.fmnist_dir, "given"
    for d in FMNIST_DIRS:
        if (d / TRAIN_IDX).exists() and (d / TEST_IDX).exists():
            return d, "found"
    d = workdir / "synthetic-fmnist"
    d.mkdir(parents=True, exist_ok=True)
    return synthetic_fmnist(d), "synthetic (no Fashion-MNIST on this machine)"


def section_tiny(rep: Report, ctx: vitb.CheckContext, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """(b) configs/tiny.yaml in-process on the check's device: extract → train → export → evaluate."""
    from pipeline import orchestrate
    from pipeline.commands import evaluate_cli
    from pipeline.config import load_config

    data, kind = fmnist_dir(args, ctx.workdir)
    out.update(data_dir=str(data), data=kind)
    overrides = [f"output_root={ctx.workdir / 'tiny'}", "extract.num_actors=0", "train.num_workers=0",
                 f"train.use_gpu={str(ctx.cuda).lower()}", f"data.path={data / TRAIN_IDX}",
                 f"data.test_path={data / TEST_IDX}", "train.run_name=gpu-check-tiny"]
    if args.quick:
        overrides += ["data.limit=128", "train.epochs=1", "train.loader_workers=0"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    out["overrides"] = overrides
    t0 = time.perf_counter()
    cache = orchestrate.ensure_cache(cfg)
    t1 = time.perf_counter()
    out["extract_s"] = t1 - t0
    result = orchestrate.train_from(cfg, cache)
    t2 = time.perf_counter()
    out.update(train_s=t2 - t1, final={k: result.metrics.get(k) for k in ("step", "epoch", "loss", "loss_fea",
                                                                          "loss_att", "samples_per_s")})
    export = orchestrate.export_run(result.run_dir, str(Path(result.run_dir) / "export_check"))
    t3 = time.perf_counter()
    out["export_s"] = t3 - t2
    ev = evaluate_cli(cfg, result.export_path or export, n_train=args.eval_train, n_test=args.eval_test)
    out.update(evaluate_s=time.perf_counter() - t3, knn_top1=ev["knn_top1"], linear_top1=ev["linear_top1"],
               n_train=ev["n_train"], n_test=ev["n_test"], train_device=ctx.device.type)
    rep.say(f"(b) tiny pipeline on {ctx.device.type}: extract {out['extract_s']:.1f} s, train {out['train_s']:.1f} s "
            f"(final loss {out['final']['loss']:.4f}), export {out['export_s']:.1f} s, evaluate "
            f"{out['evaluate_s']:.1f} s: k-NN {ev['knn_top1']:.3f}, linear {ev['linear_top1']:.3f} "
            f"({ev['n_train']}/{ev['n_test']} images, data {kind})")


# ------------------------------------------------------------------------------------------------ driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="where gpu_check.json and gpu_check.log go")
    p.add_argument("--quick", action="store_true", help="tiny shapes: the whole check in about a minute on a CPU")
    p.add_argument("--budget-s", type=float, default=None,
                   help="overall seconds for all sections (default 430, quick 120)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch data (images, checkpoints, caches; GBs at the ViT-B shapes; default: a fresh "
                        "temporary directory, deleted at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--fmnist-dir", type=Path, default=None,
                   help="Fashion-MNIST IDX directory for (b) (default: the system copy, then outputs/gpu_data/, "
                        "else a synthetic labelled set)")
    p.add_argument("--eval-train", type=int, default=None, help="(b) train images for k-NN/linear (2000; quick 256)")
    p.add_argument("--eval-test", type=int, default=None, help="(b) test images (500; quick 128)")
    p.add_argument("--log-level", default="INFO", help="log level of the project's loggers in the log file")
    args = p.parse_args(argv)
    args.eval_train = args.eval_train or (256 if args.quick else 2000)
    args.eval_test = args.eval_test or (128 if args.quick else 500)
    args.budget_s = args.budget_s or (120.0 if args.quick else 430.0)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    return args


def setup_logging(out_dir: Path, level: str) -> None:
    """Everything to ``OUTDIR/gpu_check.log``; this check's own lines also to stderr."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_file = logging.FileHandler(out_dir / "gpu_check.log")
    to_file.setFormatter(fmt)
    root.addHandler(to_file)
    to_err = logging.StreamHandler(sys.stderr)
    to_err.setFormatter(logging.Formatter("%(message)s"))
    to_err.addFilter(lambda r: r.name == "gpu_check" or r.levelno >= logging.ERROR)
    root.addHandler(to_err)
    for noisy in ("PIL", "fsspec", "asyncio", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(args.out_dir, args.log_level)
    info = machine_info()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tec_gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = vitb.Sizes.quick() if args.quick else vitb.Sizes.full(os.cpu_count() or 1)
    rep = Report(args.out_dir, info, {"quick": args.quick, "budget_s": args.budget_s, "sizes": sizes.__dict__,
                                      "workdir": str(workdir), "sections": args.sections})
    ctx = vitb.CheckContext(device=device, label=info["label"], workdir=workdir, sizes=sizes, say=rep.say)
    rep.say(f"gpu check on {info['device']} (torch {info['torch']}, CUDA {info['cuda']}, {info['cpu_count']} "
            f"cores){' — quick mode' if args.quick else ''}; budget {args.budget_s:.0f} s")
    bodies: dict[str, Callable[[float], Callable[[dict[str, Any]], None]]] = {
        "pytest_gpu": lambda cap: lambda out: section_pytest(rep, cap, out),
        "tiny_pipeline": lambda cap: lambda out: section_tiny(rep, ctx, args, out),
        "extract_vitb": lambda cap: lambda out: vitb.section_extract(ctx, out),
        "train_vitb": lambda cap: lambda out: vitb.section_train(ctx, out),
        "loader_vitb": lambda cap: lambda out: vitb.section_loader(ctx, out),
    }
    chosen = [s for s in SECTIONS if s in args.sections.split(",")]
    try:
        for name in chosen:
            left = args.budget_s - (time.perf_counter() - rep.started)
            cap = min(CAPS[name][bool(args.quick)], left)
            if cap < 10:
                rep.data["sections"][name] = {"status": "skipped", "reason": f"budget: {left:.0f} s left"}
                rep.say(f"{name}: skipped ({left:.0f} s of the budget left)")
                rep.save()
                continue
            rep.run(name, bodies[name](cap), cap)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    rep.save()
    statuses = {k: v["status"] for k, v in rep.data["sections"].items()}
    rep.say(f"done in {time.perf_counter() - rep.started:.0f} s: {statuses}; ray imported: "
            f"{rep.data['ray_imported']}; numbers in {rep.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
