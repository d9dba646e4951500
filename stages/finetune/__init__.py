"""Fine-tuning a pre-trained encoder on labelled data: full fine-tuning and PEFT with the kept TEC adapters
(docs/finetune.md), on the train stage's machinery (Ray Train workers or one in-process worker, checkpoints and
resume, the run's lease).

* :mod:`~stages.finetune.job`: what a run is (:class:`FinetuneJob`, the protocol presets) and the data checks;
* :mod:`~stages.finetune.model`: the model built from the checkpoint, with the protocol's parameters frozen;
* :mod:`~stages.finetune.data`: sample order, training views and centre-crop test views;
* :mod:`~stages.finetune.loop`: the worker loop (optimiser, mixup, schedule, evaluation, checkpoints, results);
* :mod:`~stages.finetune.run`: the driver, :func:`run_finetune`.
"""

from stages.finetune.job import PRESETS, PROTOCOLS, FinetuneInputError, FinetuneJob, check_labelled
from stages.finetune.loop import RESULTS_FILE, finetune_worker
from stages.finetune.model import build_model
from stages.finetune.run import run_finetune

__all__ = ["PRESETS", "PROTOCOLS", "RESULTS_FILE", "FinetuneInputError", "FinetuneJob", "build_model",
           "check_labelled", "finetune_worker", "run_finetune"]
