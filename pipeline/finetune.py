"""Fine-tune a checkpoint on the config's labelled splits: full fine-tuning or PEFT with the kept adapters
(docs/finetune.md).

:func:`finetune_cli` turns a :class:`~pipeline.config.PipelineConfig` into a :class:`stages.finetune.FinetuneJob`:
the architecture of the ``model`` (new model) or the ``base``, the config's preprocessing (mean/std, output size)
and input policy, the ``train`` section's resources (workers, GPU, threads, loader processes, precision, seed), the
protocol's preset recipe (:data:`stages.finetune.PRESETS`) under the ``finetune`` section's non-null fields, under
the caller's overrides. Runs live in ``<output_root>/finetune/`` (beside the training runs of
``<output_root>/runs/``), named ``<which>-<protocol>-<digest>`` where the digest
covers the job's recipe, the checkpoint's URL and the data: calling it again with the same arguments resumes (or
re-reads) the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

from infra import storage
from pipeline import config as C
from pipeline.labelled import LabelledData
from stages.finetune import PROTOCOLS, FinetuneJob, run_finetune
from stages.uri_policy import UriPolicy

log = logging.getLogger(__name__)

WHICH = ("model", "base")
FINETUNE_DIR = "finetune"
RESOURCES = ("num_workers", "use_gpu", "threads_per_worker", "loader_workers", "amp_dtype", "max_failures",
             "keep_checkpoints", "seed")


def finetune_root(output_root: str) -> str:
    """Where the fine-tuning runs of an output root live: ``<output_root>/finetune``."""
    return storage.join(output_root, FINETUNE_DIR)


def finetune_job(cfg: C.PipelineConfig, checkpoint: str, which: str, protocol: str, data: LabelledData,
                 **overrides: Any) -> FinetuneJob:
    """The fine-tuning job of a config (see the module docstring).

    Args:
        cfg: the pipeline config.
        checkpoint: the encoder's checkpoint URL (``peft_*``: a kept-adapter export, ``export/encoder_adapters.pth``).
        which: ``model`` (the config's new-model architecture) or ``base``.
        protocol: one of :data:`stages.finetune.PROTOCOLS`.
        data: the labelled splits (:func:`pipeline.labelled.labelled_splits`).
        **overrides: any :class:`FinetuneJob` field (``epochs``, ``batch_size``, ``blr`` ...), over the config's
            ``finetune`` section and the preset.

    Raises:
        ValueError: an unknown ``which`` / ``protocol``, or an invalid field (naming it).
    """
    if which not in WHICH:
        raise ValueError(f"which: must be one of {WHICH}, got {which!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: must be one of {PROTOCOLS}, got {protocol!r}")
    kwargs = C.base_timm_kwargs(cfg) if which == "base" else C.model_timm_kwargs(cfg)
    fields: dict[str, Any] = {k: getattr(cfg.train, k) for k in RESOURCES}
    fields |= {"run_name": "pending", "storage_path": storage.absolute(finetune_root(cfg.output_root)),
               "checkpoint_url": storage.absolute(checkpoint), "timm_kwargs": kwargs, "num_classes": data.num_classes,
               "preprocess": C.preprocess(cfg).to_dict(), "uri_policy": dataclasses.asdict(UriPolicy.of(cfg.data))}
    if protocol == "finetune" and (key := C.checkpoint_key_for(cfg, checkpoint, which)) is not None:
        fields["checkpoint_key"] = key
    recipe = {k: v for k, v in dataclasses.asdict(cfg.finetune).items() if v is not None}
    job = FinetuneJob.for_protocol(protocol, **(fields | recipe | overrides))
    if "run_name" in overrides:
        return job
    identity = {"recipe": job.fingerprint_fields(), "checkpoint": storage.redact_url(job.checkpoint_url),
                "data": [data.source_desc, data.train.num_rows, data.test.num_rows]}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return job.replace(run_name=f"{which}-{protocol}-{digest}")


def finetune_cli(cfg: C.PipelineConfig, checkpoint: str, which: str, protocol: str, data: LabelledData,
                 **overrides: Any) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` with ``protocol`` on ``data`` and return the run's results (``results.json``, plus
    ``run_dir`` and ``data``: where the splits came from).

    Args: as :func:`finetune_job`.
    """
    job = finetune_job(cfg, checkpoint, which, protocol, data, **overrides)
    if job.num_workers > 0:
        from infra.ray_cluster import ensure_ray

        ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    log.info("fine-tuning %s (%s, %s) on %s: %d train / %d test images, %d classes", storage.redact_url(checkpoint),
             which, protocol, data.source_desc, data.train.num_rows, data.test.num_rows, data.num_classes)
    results = run_finetune(job, data.train, data.test, address=cfg.ray.address)
    return results | {"run_dir": job.run_url, "data": data.source_desc}
