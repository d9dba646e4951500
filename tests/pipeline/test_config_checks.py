"""The config reports the model's own rules (tec_model's) under the dotted keys a user changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from tec_model import TECModel
from tec_model.archs import vit_kwargs
from tec_model.optim import lr_schedule

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _errors(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    return err.value.errors


def test_a_register_token_new_model_is_refused_by_the_config_as_by_the_model() -> None:
    (line,) = _errors(["model.timm_overrides.reg_tokens=4"])
    assert line.startswith("model.timm_overrides.reg_tokens: the new model must be a plain ViT")
    with pytest.raises(ValueError) as err:
        TECModel(vit_kwargs("vit_micro_patch4_32", in_chans=1, reg_tokens=4), 192, 6, 64)
    assert line.split(": ", 1)[1] in str(err.value)  # one message, from the model's own check


def test_the_pixel_mae_base_is_checked_only_when_it_is_pre_trained() -> None:
    reg = ["base.timm_overrides.reg_tokens=4", "base.timm_overrides.no_embed_class=true"]
    assert load_config(TINY, [*reg, "base.checkpoint=/x/base.pth"]).base.timm_overrides["reg_tokens"] == 4
    (line,) = _errors([*reg, "base.checkpoint=null", "base.pretrain.epochs=2"])
    assert line.startswith("base.timm_overrides.reg_tokens: the new model must be a plain ViT")
    assert "set base.checkpoint" in line


def test_sibling_fields_in_a_model_message_are_named_by_their_dotted_key() -> None:
    assert _errors(["model.decoder_dim=66"]) == ["model.decoder_dim: 66 must be divisible by 4 and by "
                                                 "model.decoder_heads 4"]
    assert _errors(["base.pretrain.decoder_dim=66"]) == ["base.pretrain.decoder_dim: 66 must be divisible by 4 and "
                                                         "by base.pretrain.decoder_heads 4"]


def test_a_failed_field_silences_the_model_rules_that_read_it() -> None:
    assert [e.split(":")[0] for e in _errors(["model.decoder_heads=x", "model.decoder_dim=66"])] == \
        ["model.decoder_heads"]


def test_the_pretrain_batch_is_checked_only_when_the_base_is_pre_trained() -> None:
    split = ["train.num_workers=3", "train.global_batch=384"]  # 384 splits over 3 workers, the default 256 does not
    assert load_config(TINY, [*split, "base.checkpoint=x.pth"]).base.pretrain.global_batch == 256
    assert load_config(TINY, [*split, "base.pretrain.epochs=0", "base.pretrain.blr=0"]).train.num_workers == 3
    assert _errors([*split, "base.checkpoint=null", "base.pretrain.epochs=2"]) == \
        ["base.pretrain.global_batch: 256 is not divisible by train.num_workers (3)"]


@pytest.mark.parametrize(("overrides", "line"), [
    (["train.epochs=1", "train.warmup_epochs=2"], "train.warmup_epochs: 2 exceeds train.epochs (1)"),
    (["base.pretrain.epochs=3", "base.pretrain.warmup_epochs=3.5"],
     "base.pretrain.warmup_epochs: 3.5 exceeds base.pretrain.epochs (3)"),
    (["finetune.epochs=4", "finetune.warmup_epochs=5"], "finetune.warmup_epochs: 5 exceeds finetune.epochs (4)"),
])
def test_a_warm_up_longer_than_its_schedule_is_refused(overrides: list[str], line: str) -> None:
    (error,) = _errors(overrides)
    assert error.startswith(line)


def test_a_warm_up_as_long_as_its_schedule_is_accepted_as_by_lr_schedule() -> None:
    cfg = load_config(TINY, ["train.epochs=2", "train.warmup_epochs=2", "finetune.epochs=4",
                             "finetune.warmup_epochs=4", "base.pretrain.warmup_epochs=9"])  # pre-training is off
    per_epoch = 5
    assert len(lr_schedule(1.0, cfg.train.epochs * per_epoch, round(cfg.train.warmup_epochs * per_epoch))) == 10
    with pytest.raises(ValueError, match="warmup_steps"):  # what train.epochs=1 warmup_epochs=2 met in every worker
        lr_schedule(1.0, 1 * per_epoch, round(2 * per_epoch))
    assert load_config(TINY, ["base.checkpoint=x.pth", "base.pretrain.epochs=2",
                              "base.pretrain.warmup_epochs=9"]).base.pretrain.warmup_epochs == 9
