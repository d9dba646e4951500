"""The models of replication v2 (experiments/replicate_v2.py): what each is (a :class:`Recipe`), how it is built
from the pipeline (:func:`build`) and what it cost (wall seconds, analytic MACs; FLOPs = 2×MACs).

Every recipe is the v2 config plus overrides, so it is deterministic and rebuilt the same way after its files are
gone: the base by :func:`pipeline.orchestrate.prepare_base` (reused when its run exists), TEC by
:func:`pipeline.orchestrate.ensure_cache` + :func:`pipeline.orchestrate.train_from` under a fixed run name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from infra import storage
from pipeline import config as C
from pipeline import ledger
from pipeline.flops import tec_step_macs
from pipeline.orchestrate import ensure_cache, prepare_base, prepare_manifest, train_from
from pipeline.registry import runs_root
from tec_model.archs import num_patches

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Recipe:
    """One model of the replication: ``kind`` is ``random`` | ``mae`` | ``tec``; ``which`` is how the pipeline
    loads it (``base``: the base architecture, ``model``: the new model's); ``ft_seeds`` are the fine-tuning seeds
    it is scored with (None: the driver's ``--seeds``; the compared models: their own seed, so a variant's spread
    over model seeds carries the fine-tuning noise too)."""

    name: str
    kind: str
    overrides: tuple[str, ...]
    which: str
    base_epochs: int
    tec_epochs: int = 0
    seed: int = 0
    attention_target: bool = True
    finetune_protocols: tuple[str, ...] = ("finetune",)
    ft_seeds: tuple[int, ...] | None = None
    config: str = field(default="", compare=False)

    def describe(self) -> dict[str, Any]:
        """The row fields naming the model (its recipe)."""
        return {"model": self.name, "model_kind": self.kind, "overrides": list(self.overrides),
                "base_epochs": self.base_epochs, "tec_epochs": self.tec_epochs, "seed": self.seed,
                "attention_target": self.attention_target}


@dataclass(frozen=True)
class Built:
    """A built model: its checkpoint URL, the seconds its training took when measured here (None: reused), and its
    MACs by part (``pretrain``, ``extract``, ``train``; each forward + backward where trained)."""

    checkpoint: str
    seconds: float | None
    macs: dict[str, int]


def random_init(config: str) -> Recipe:
    """A seeded random-init encoder of the base architecture (the pipeline's ``pretrain.epochs: 0`` base)."""
    return Recipe("random_init", "random", ("base.pretrain.epochs=0",), "base", 0, config=config)


def mae_base(config: str, epochs: int, seed: int = 0, ft_seeds: tuple[int, ...] | None = None) -> Recipe:
    """The pixel-MAE base pre-trained for ``epochs`` (its own cosine schedule) with pre-training seed ``seed``."""
    return Recipe(f"mae_e{epochs}_s{seed}", "mae", (f"base.pretrain.epochs={epochs}", f"base.pretrain.seed={seed}"),
                  "base", epochs, seed=seed, ft_seeds=ft_seeds, config=config)


def tec(config: str, base_epochs: int, epochs: int, seed: int, attention_target: bool = True,
        codec: str = "float16") -> Recipe:
    """TEC for ``epochs`` from the cache (``extract.codec``) of the seed-0 base at ``base_epochs``; ``seed`` is
    TEC's (init, order, masks) and its fine-tuning seed; the lossless seed-0 model is also scored with the PEFT
    protocols (its export keeps the adapters)."""
    tag = ("" if attention_target else "_noatt") + ("" if codec == "float16" else f"_{codec}")
    peft = attention_target and seed == 0 and codec == "float16"
    return Recipe(f"tec{tag}_b{base_epochs}_e{epochs}_s{seed}", "tec",
                  (f"base.pretrain.epochs={base_epochs}", "base.pretrain.seed=0", f"train.epochs={epochs}",
                   f"train.seed={seed}", f"model.attention_target={str(attention_target).lower()}",
                   f"extract.codec={codec}"),
                  "model", base_epochs, epochs, seed, attention_target,
                  ("finetune", "peft_prompt", "peft_both") if peft else ("finetune",), ft_seeds=(seed,),
                  config=config)


def compare_recipes(config: str, base_epochs: int, tec_epochs: int, seeds: int) -> list[Recipe]:
    """At the saturated base: TEC (attention on) and MAE at the same total budget, ``seeds`` each, then TEC with the
    attention target off (seed 0); each scored with one fine-tuning run (its seed)."""
    out = []
    for s in range(seeds):
        out += [tec(config, base_epochs, tec_epochs, s),
                mae_base(config, base_epochs + tec_epochs, seed=s, ft_seeds=(s,))]
    return [*out, tec(config, base_epochs, tec_epochs, 0, attention_target=False)]


def codec_recipes(config: str, base_epochs: int, tec_epochs: int, seeds: int) -> list[Recipe]:
    """TEC from the int8 and fp8 caches of the saturated base, ``seeds`` each (the lossless rows are compare's),
    seed by seed: a run stopped early has as many seeds of one codec as of the other."""
    return [tec(config, base_epochs, tec_epochs, s, codec=c) for s in range(seeds) for c in ("int8", "fp8")]


def kept_adapters(export_url: str) -> str:
    """The kept-adapter export beside a TEC export's ``encoder.pth`` (PEFT's checkpoint)."""
    return export_url.rsplit("/", 1)[0] + "/encoder_adapters.pth"


def build(recipe: Recipe) -> Built:
    """Build (or reuse) ``recipe``'s model and measure what it cost."""
    cfg = C.load_config(recipe.config, list(recipe.overrides))
    if recipe.kind == "random":
        return Built(prepare_base(cfg), None, {})
    if recipe.kind == "mae":
        return _build_mae(cfg)
    return _build_tec(cfg, recipe)


def _pretrain_macs(cfg: C.PipelineConfig, samples: int) -> int:
    """Forward + backward MACs of ``samples`` pixel-MAE pre-training steps' samples (the base's TECModel with a
    pixel target: no adapters, no attention path)."""
    kw, p = C.base_timm_kwargs(cfg), cfg.base.pretrain
    pixels = kw["patch_size"] ** 2 * kw.get("in_chans", 3)
    per = tec_step_macs(kw, pixels, kw["num_heads"], num_patches(kw), mask_ratio=p.mask_ratio, adapters="none",
                        attention_target=False, topk=1, decoder_dim=p.decoder_dim, decoder_depth=p.decoder_depth,
                        decoder_heads=p.decoder_heads)
    return samples * per["train_macs_per_sample"]


def _pretrain_samples(cfg: C.PipelineConfig, epochs: int) -> int:
    """Samples a pre-training of ``epochs`` serves (drop_last epochs of ``global_batch``)."""
    _, _, n_images = prepare_manifest(cfg)
    gb = cfg.base.pretrain.global_batch
    return epochs * (n_images // gb) * gb


def _build_mae(cfg: C.PipelineConfig) -> Built:
    import time

    started = time.perf_counter()
    checkpoint = prepare_base(cfg)
    seconds = time.perf_counter() - started
    samples = _pretrain_samples(cfg, cfg.base.pretrain.epochs)
    return Built(checkpoint, seconds if seconds > 5 else None, {"pretrain": _pretrain_macs(cfg, samples)})


def _build_tec(cfg: C.PipelineConfig, recipe: Recipe) -> Built:
    """The base (reused), its cache (extracted or reused) and a TEC run under a fixed name (reused when its export
    exists; resumed when interrupted)."""
    import time

    base = _build_mae(cfg)
    cache = ensure_cache(cfg)
    name = f"v2-{recipe.name}"
    export = storage.join(runs_root(cfg.output_root), name, "export", "encoder.pth")
    started, seconds = time.perf_counter(), None
    if not storage.exists(export):
        export = train_from(cfg, cache, run_name=name).export_path
        seconds = time.perf_counter() - started
    extractions, runs = ledger.read_ledger(cache.url)
    run = [r for r in runs.to_pylist() if r["run_name"] == name]
    macs = {"pretrain": base.macs["pretrain"], "extract": int(sum(extractions.column("base_macs_total").to_pylist())),
            "train": int(run[-1]["train_macs"]) if run else 0}
    if run and seconds is None:
        seconds = float(run[-1]["wall_seconds"])
    return Built(export, seconds, macs)
