"""Where the stages compute, and in what precision: one place for every device-dependent choice.

* **Device.** ``resolve_device`` turns a stage's setting into a ``torch.device`` and refuses a GPU request on a
  machine without CUDA, so a config never silently falls back to the CPU.
* **Autocast.** Training and extraction use autocast on CUDA only (``bfloat16`` by default, ``float16`` on
  request); CPU runs in float32. :func:`autocast` is the one context manager for both stages.
* **Extraction precision.** The precision of the base model's forward changes the stored bytes, so it is recorded
  in the cache (``targets.precision``) and a writer of another precision is refused under the same key:
  :func:`extraction_precision` resolves ``extract.precision`` (``auto``: bfloat16 on CUDA, float32 on CPU).
* **TF32.** Float32 matmuls outside autocast (the online base model in float32, the evaluation) may use TF32 on
  Ampere and later GPUs; :func:`configure_matmul` states the choice instead of inheriting torch's default.
* **Loader.** Host-to-device copies overlap compute when the loader pins memory (:func:`pin_memory_for`) and the
  copies are ``non_blocking``.

Masks are drawn from CPU generators on the CPU and moved (see :func:`tec_model.masking.random_masking`), so the same
(seed, step, rank, micro-batch) gives the same mask on every device.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
AMP_DTYPES = ("bfloat16", "float16")


class DeviceUnavailableError(RuntimeError):
    """A stage was asked for a GPU on a machine where CUDA is not available."""


def resolve_device(use_gpu: bool | str, what: str = "train.use_gpu") -> torch.device:
    """The device a stage computes on.

    Args:
        use_gpu: ``True`` (CUDA required), ``False`` (CPU) or ``"auto"`` (CUDA when available).
        what: the config field named in the error.

    Raises:
        DeviceUnavailableError: a GPU was required and CUDA is not available.
    """
    if use_gpu == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if use_gpu:
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"{what} is true but CUDA is not available on this machine "
                                         f"(torch {torch.__version__}); set {what}=false to run on the CPU")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def extraction_precision(setting: str, device: torch.device | None) -> str:
    """The dtype name the base model's forward runs in for ``extract.precision`` on ``device``.

    ``device`` None: the workers' device is not known yet (a cache spec resolved on the driver, before the workers
    start); the setting is checked by name and ``auto`` reads as ``float32``, a placeholder that the extract driver
    replaces with its workers' own precision (it is recorded in the cache, not part of its key).

    Raises:
        ValueError: an unknown setting, or float16 on the CPU (CPU autocast is bfloat16 only here).
    """
    if setting not in PRECISIONS:
        raise ValueError(f"extract.precision must be one of {PRECISIONS}, got {setting!r}")
    if device is None:
        return "float32" if setting == "auto" else setting
    if setting == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if setting == "float16" and device.type != "cuda":
        raise ValueError("extract.precision float16 needs a CUDA device (use float32 or bfloat16 on the CPU)")
    return setting


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast to ``precision`` (a dtype name) on ``device``; ``float32`` runs without autocast."""
    if precision == "float32":
        yield
        return
    with torch.autocast(device.type, dtype=getattr(torch, precision)):
        yield


def train_precision(device: torch.device, amp_dtype: str) -> str:
    """Training's compute precision: ``amp_dtype`` autocast on CUDA, float32 on the CPU."""
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"train.amp_dtype must be one of {AMP_DTYPES}, got {amp_dtype!r}")
    return amp_dtype if device.type == "cuda" else "float32"


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for float16 autocast (bfloat16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "float16")


def configure_matmul(allow_tf32: bool = True) -> None:
    """State the float32 matmul precision: TF32 on (``"high"``) or off (``"highest"``), cuDNN alike."""
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")


def pin_memory_for(device: torch.device) -> bool:
    """Whether a loader feeding ``device`` should pin its batches (CUDA only)."""
    return device.type == "cuda"


def describe(device: torch.device) -> str:
    """A one-line description for logs and results: ``cpu`` or the GPU's name."""
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def sum_over_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` summed over the process group's ranks, returned on the CPU.

    The all-reduce runs on ``device``, the one the ranks train on: NCCL, the backend Ray Train and ``torchrun``
    pick for GPU workers, reduces CUDA tensors only, and gloo reduces CPU ones. Every rank must call it with the
    same shape and dtype at the same point.

    Args:
        values: any shape; a CPU tensor (float64 or int64 sums keep their precision on both backends).
        device: the rank's training device.
    """
    import torch.distributed as dist

    on = values.to(device)
    dist.all_reduce(on)
    return on.cpu()
