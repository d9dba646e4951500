#!/usr/bin/env python
"""Replication v2: TEC at a saturated pixel-MAE base, under fine-tuning as well as frozen probes (docs/replication.md).

    python experiments/replicate_v2.py [--config configs/fmnist_replication_v2.yaml] [--only STEP ...] [--table]
                                       [--doc docs/replication.md]

Resumable, one model at a time: every finished model and every finished evaluation is one JSON line of ``--rows``
(default ``docs/replication_v2_results.jsonl``, committed with the code, so a later session on a fresh checkout
skips what is done). A model a later step needs is rebuilt from its recipe when its checkpoint is gone (every
recipe is deterministic); its SHA-256 is compared with the recorded one and a mismatch is logged.

Steps (``--only`` takes their names; default: all in this order):
    sizing      fine-tuning recipes (:data:`SIZING`) on the random init and a cheap base: which one separates them;
    random      a seeded random-init encoder under every protocol: the floor each protocol must separate from;
    saturation  the pixel-MAE base pre-trained for each of ``--base-epochs`` epochs (separate cosine schedules),
                under every protocol; :func:`saturated_epochs` picks the first E whose doubling gains less than the
                fine-tuning seed spread;
    compare     at the saturated base: TEC from its cache and MAE trained to the same total budget, ``--seeds``
                seeds each, attention target on and off (TEC), the PEFT settings for TEC; every model under every
                protocol, each fine-tuning protocol once per model (its own seed: the seeds of a variant vary its
                pre-training and its fine-tuning together);
    codecs      at the saturated base: TEC from the int8 and fp8 caches (``extract.codec``), ``--seeds`` each,
                against compare's lossless TEC seeds (the codecs' effect on accuracy).

Every row names the machine it ran on and carries wall seconds and analytic MACs (FLOPs = 2×MACs;
:mod:`pipeline.flops`; TEC rows read their training and extraction MACs from the cache's ledger).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import replication_v2_models as M
from experiments.replication_v2_doc import blocks, fill
from experiments.replication_v2_table import saturated_epochs, scores, table
from infra.logs import setup_logging
from pipeline import config as C
from pipeline.commands import evaluate_cli
from pipeline.finetune import finetune_cli
from pipeline.labelled import labelled_splits

log = logging.getLogger("replicate_v2")

STEPS = ("sizing", "random", "saturation", "compare", "codecs")
BASE_EPOCHS = (8, 16, 32, 64)  # the saturation curve's default points
FROZEN = ("knn", "linear")
# Fine-tuning recipes tried on a random init and the cheapest base (``sizing``): FinetuneJob fields over the config's
# ``finetune`` section, plus ``n_train`` (labelled images). The protocol is sized when a recipe separates the two
# by more than the seed spread; the config's section then holds it for every other step.
SIZING: dict[str, dict[str, Any]] = {
    "config": {},
    "b16_ld75": {"epochs": 10, "batch_size": 16, "warmup_epochs": 1, "layer_decay": 0.75},
    "b16_ld75_e20": {"epochs": 20, "batch_size": 16, "warmup_epochs": 2, "layer_decay": 0.75},
}
SIZING_BASE_EPOCHS = 32
# ``finetune`` fields that change no final score (stages.finetune.MUTABLE_FIELDS: reporting only), left out of the
# recorded settings.
SCORE_NEUTRAL = frozenset({"eval_every"})


def machine() -> str:
    """The machine a row ran on, in words: CPU count, accelerator, torch version."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()} {platform.system()}, {device}, torch {torch.__version__}"


@functools.cache
def commit() -> str | None:
    """The git commit of this checkout when first asked (None outside git): :func:`main` asks at start, so every
    row names the code the process runs even if the checkout moves meanwhile."""
    head = Path(__file__).resolve().parents[1] / ".git"
    try:
        import subprocess

        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=head.parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class Rows:
    """The results file: one JSON object a line, keyed by ``key``; the last line of a key wins."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{self.path}:{n}: not a JSON row ({err})") from None
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {**row, "machine": machine(), "commit": commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        self.rows[row["key"]] = row
        return row


def sha256_of(url: str) -> str:
    from infra import storage

    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


def ensure_model(rows: Rows, recipe: M.Recipe) -> str:
    """The checkpoint of ``recipe``: reused when its file exists, else built; its model row is added once."""
    done = rows.get(f"model/{recipe.name}")
    built = M.build(recipe)
    sha = sha256_of(built.checkpoint)
    if done is None:
        rows.add({"key": f"model/{recipe.name}", "kind": "model", **recipe.describe(), "checkpoint_sha256": sha,
                  "seconds": built.seconds, "macs": built.macs})  # None: reused, not timed here
    elif done["checkpoint_sha256"] != sha:
        log.warning("%s: rebuilt checkpoint %s differs from the recorded %s (another machine or library version)",
                    recipe.name, sha[:12], done["checkpoint_sha256"][:12])
    return built.checkpoint


def evaluate_model(rows: Rows, cfg_path: str, recipe: M.Recipe, args: argparse.Namespace) -> None:
    """Every protocol of ``recipe`` not yet in ``rows``: frozen k-NN / linear once, each fine-tuning protocol per
    fine-tuning seed (``recipe.ft_seeds``, else ``--seeds``)."""
    seeds = range(args.seeds) if recipe.ft_seeds is None else recipe.ft_seeds
    wanted = [(p, None) for p in FROZEN] + [(p, s) for p in recipe.finetune_protocols for s in seeds]
    todo = [(p, s) for p, s in wanted if rows.get(eval_key(recipe.name, p, s)) is None]
    if not todo:
        return
    checkpoint = ensure_model(rows, recipe)
    cfg = C.load_config(cfg_path, recipe.overrides)
    if any(p in FROZEN for p, _ in todo):
        started = time.perf_counter()
        ev = evaluate_cli(cfg, checkpoint, which=recipe.which, n_train=args.probe_train, n_test=args.probe_test,
                          protocols="knn,linear")
        for p in FROZEN:
            rows.add({"key": eval_key(recipe.name, p, None), "kind": "eval", "model": recipe.name, "protocol": p,
                      "seed": None, "top1": ev[f"{p}_top1"], "n_train": ev["n_train"], "n_test": ev["n_test"],
                      "seconds": time.perf_counter() - started})
    data = labelled_splits(cfg, args.ft_train, args.ft_test)
    for p, seed in todo:
        if p in FROZEN:
            continue
        url = checkpoint if p == "finetune" else M.kept_adapters(checkpoint)
        res = finetune_cli(cfg, url, recipe.which, p, data, seed=seed)
        rows.add({"key": eval_key(recipe.name, p, seed), "kind": "eval", "model": recipe.name, "protocol": p,
                  "seed": seed, "top1": res["test_top1"], "best_top1": res["best_test_top1"],
                  "n_train": res["n_train"], "n_test": res["n_test"], "epochs": res["epochs"],
                  "seconds": run_seconds(res)})
        log.info("%s %s seed %d: top-1 %.4f", recipe.name, p, seed, res["test_top1"])


def run_seconds(results: dict[str, Any]) -> float:
    """A fine-tuning run's own seconds: the sum over its epochs (a run reused from an earlier call keeps its time)."""
    return float(sum(h["seconds"] for h in results["history"]))


def eval_key(model: str, protocol: str, seed: int | None) -> str:
    return f"eval/{model}/{protocol}" + ("" if seed is None else f"/seed{seed}")


def check_settings(rows: Rows, args: argparse.Namespace) -> None:
    """Record the evaluation settings in the rows file's first row, or refuse settings other than the recorded ones
    (rows scored another way would sit in one table unmarked)."""
    import dataclasses

    cfg = C.load_config(args.config)
    recipe = {k: v for k, v in dataclasses.asdict(cfg.finetune).items() if k not in SCORE_NEUTRAL}
    settings = {"config": args.config, "data_limit": cfg.data.limit, "finetune": recipe,
                "probe_train": args.probe_train, "probe_test": args.probe_test, "ft_train": args.ft_train,
                "ft_test": args.ft_test, "seeds": args.seeds}
    recorded = rows.get("settings")
    if recorded is None:
        rows.add({"key": "settings", "kind": "settings", **settings})
        return
    changed = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
    if changed:
        raise SystemExit(f"{rows.path}: its rows were made with other settings ("
                         + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
                         + "); pass --rows with a new file or the recorded settings")


def run_sizing(rows: Rows, args: argparse.Namespace) -> None:
    """Every :data:`SIZING` recipe on the random init and the ``SIZING_BASE_EPOCHS`` base, seed 0."""
    for recipe in (M.random_init(args.config), M.mae_base(args.config, SIZING_BASE_EPOCHS)):
        cfg = C.load_config(args.config, list(recipe.overrides))
        for name, fields in SIZING.items():
            key = f"sizing/{name}/{recipe.name}"
            if rows.get(key) is not None:
                continue
            fields = dict(fields)
            data = labelled_splits(cfg, fields.pop("n_train", args.ft_train), args.ft_test)
            res = finetune_cli(cfg, ensure_model(rows, recipe), recipe.which, "finetune", data, seed=0, **fields)
            rows.add({"key": key, "kind": "sizing", "recipe": name, "fields": SIZING[name], "model": recipe.name,
                      "top1": res["test_top1"], "best_top1": res["best_test_top1"], "train_loss": res["train_loss"],
                      "n_train": res["n_train"], "n_test": res["n_test"], "seconds": run_seconds(res)})
            log.info("sizing %s on %s: top-1 %.4f", name, recipe.name, res["test_top1"])


def run_step(step: str, rows: Rows, args: argparse.Namespace) -> None:
    """Build and evaluate every model of ``step`` (see the module docstring)."""
    if step == "sizing":
        run_sizing(rows, args)
        return
    if step == "random":
        recipes = [M.random_init(args.config)]
    elif step == "saturation":
        recipes = [M.mae_base(args.config, e, seed=0) for e in args.base_epochs]
    else:
        e_star = compare_base(rows, args)
        make = M.compare_recipes if step == "compare" else M.codec_recipes
        recipes = make(args.config, e_star, args.tec_epochs, args.seeds)
    for recipe in recipes:
        log.info("=== %s ===", recipe.name)
        evaluate_model(rows, args.config, recipe, args)


def compare_base(rows: Rows, args: argparse.Namespace) -> int:
    """The base epochs ``compare`` and ``codecs`` start from: the saturated E, else ``--compare-at`` (the curve not
    saturated within the budget; the table says so), else an error."""
    e_star = saturated_epochs(rows.rows, args.base_epochs)
    if e_star is not None:
        if args.compare_at not in (None, e_star):
            raise SystemExit(f"--compare-at {args.compare_at}: the curve saturates at E = {e_star}; compare there")
        return e_star
    if args.compare_at is None:
        raise SystemExit("compare needs a saturated base: no doubling of --base-epochs "
                         f"{','.join(map(str, args.base_epochs))} gains less than the seed spread in {rows.path}; "
                         "extend the curve (--only saturation --base-epochs ...) or pass --compare-at E")
    if args.compare_at not in args.base_epochs or scores(rows.rows, f"mae_e{args.compare_at}_s0", "finetune") == []:
        raise SystemExit(f"--compare-at {args.compare_at}: not a measured point of the saturation curve "
                         f"(--base-epochs {','.join(map(str, args.base_epochs))})")
    log.warning("comparing at base E = %d: the curve is not saturated there", args.compare_at)
    return args.compare_at


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fmnist_replication_v2.yaml")
    p.add_argument("--rows", default="docs/replication_v2_results.jsonl", help="the results file (JSON lines)")
    p.add_argument("--only", nargs="*", choices=STEPS, help="steps to run (default: all, in order)")
    p.add_argument("--base-epochs", type=lambda s: [int(x) for x in s.split(",")], default=list(BASE_EPOCHS),
                   help="the saturation curve's base pre-training epochs, comma-separated, doubling")
    p.add_argument("--compare-at", type=int, default=None, help="base epochs of compare/codecs when the curve does "
                   "not saturate within the budget (a measured point; the table marks it unsaturated)")
    p.add_argument("--tec-epochs", type=int, default=16, help="TEC's epochs at the saturated base (MAE gets as many)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds of the random init and of each saturation "
                   "point; model seeds of each compared variant")
    p.add_argument("--probe-train", type=int, default=10000, help="train-split images of the k-NN bank / probe")
    p.add_argument("--probe-test", type=int, default=10000, help="test-split images of k-NN / linear")
    p.add_argument("--ft-train", type=int, default=1000, help="labelled train images fine-tuning sees (its recipe: the "
                   "config's finetune section)")
    p.add_argument("--ft-test", type=int, default=2000, help="test images fine-tuning is scored on")
    p.add_argument("--table", action="store_true", help="print the results table (Markdown) and exit")
    p.add_argument("--doc", default=None, help="rewrite the marked v2 tables of this Markdown file (e.g. "
                   "docs/replication.md) from the rows")
    args = p.parse_args(argv)
    setup_logging()
    rows = Rows(args.rows)
    commit()
    if not args.table:
        check_settings(rows, args)
        for step in args.only or STEPS:
            run_step(step, rows, args)
    print(table(rows.rows, args.base_epochs))
    if args.doc:
        doc = Path(args.doc)
        doc.write_text(fill(doc.read_text(), blocks(rows.rows, args.base_epochs), args.doc))
        log.info("rewrote the v2 tables of %s", args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
