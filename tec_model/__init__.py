"""Pure torch + timm modules and losses for TEC (no Ray, no Zarr, no fsspec)."""

from tec_model.archs import ARCHS, build_vit, num_patches, vit_kwargs
from tec_model.base import BaseModel, BaseTargets, compute_targets
from tec_model.checkpoint import CheckpointError, load_encoder_weights, read_checkpoint, unwrap_state_dict
from tec_model.export import export_encoder, export_mae, export_with_adapters, fold_tec_state_dict
from tec_model.losses import attention_loss, channel_norm, feature_loss, normalize_features, patch_norm, patchify
from tec_model.masking import random_masking
from tec_model.tec import TECModel

__all__ = [
    "ARCHS",
    "BaseModel",
    "BaseTargets",
    "CheckpointError",
    "TECModel",
    "attention_loss",
    "build_vit",
    "channel_norm",
    "compute_targets",
    "export_encoder",
    "export_mae",
    "export_with_adapters",
    "feature_loss",
    "fold_tec_state_dict",
    "load_encoder_weights",
    "normalize_features",
    "num_patches",
    "patch_norm",
    "patchify",
    "random_masking",
    "read_checkpoint",
    "unwrap_state_dict",
    "vit_kwargs",
]
