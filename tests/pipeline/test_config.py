"""The pipeline configuration: shipped configs, overrides, validation errors, redaction and job mapping."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    base_timm_kwargs,
    check_name,
    default_run_name,
    dump_yaml,
    load_config,
    model_timm_kwargs,
    preprocess,
    redact,
    resolved_dict,
    to_extract_job,
    to_pretrain_job,
    to_train_job,
)
from pipeline.config_schema import ModelConfig, PipelineConfig, TrainConfig
from stages.train.job import TrainJob
from stages.uri_policy import UriPolicy
from stages.views import FASHION_MNIST_MEAN, Preprocess

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
TINY = next(p for p in CONFIGS if p.name == "tiny.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_maps_onto_valid_jobs(path: Path) -> None:
    cfg = load_config(path)
    job = to_train_job(cfg, "mem://cache", "run", "mem://runs")
    assert job.topk <= job.k_max and job.global_batch % (max(1, job.num_workers) * job.accum_steps) == 0
    extract = to_extract_job(cfg, "mem://cache", "mem://m.parquet", "mem://base.pth")
    assert extract.preprocess.output_size == extract.timm_kwargs["img_size"]
    assert extract.preprocess.channels == extract.timm_kwargs["in_chans"]


def test_expected_shipped_configs_and_paper_settings() -> None:
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "demo.yaml", "fmnist_replication.yaml", "imagenet_vitb_mae.yaml", "imagenet_vitb_ibot.yaml",
            "imagenet_vitl_mae.yaml"} <= names
    paper = {"imagenet_vitb_mae.yaml": (15, 1.8), "imagenet_vitb_ibot.yaml": (9, 1.0),
             "imagenet_vitl_mae.yaml": (15, 1.4)}
    for name, (topk, tau) in paper.items():
        cfg = load_config(TINY.with_name(name))
        assert (cfg.model.topk, cfg.model.att_tau) == (topk, tau)
        t = cfg.train
        assert (t.global_batch, t.accum_steps, t.blr, t.epochs, t.warmup_epochs, t.weight_decay) == \
            (4096, 2, 1.5e-4, 300, 40, 0.05)
        assert (cfg.model.mask_ratio, cfg.extract.last_layers, cfg.model.decoder_dim) == \
            (0.75, 2, 768 if name == "imagenet_vitl_mae.yaml" else 512)  # the official TEC decoder widths


def test_tiny_config_is_tiny_and_builds_its_model() -> None:
    cfg = load_config(TINY)
    assert cfg.data.limit is not None and cfg.data.limit <= 512 and cfg.extract.views_per_image == 2
    assert base_timm_kwargs(cfg)["in_chans"] == model_timm_kwargs(cfg)["in_chans"] == 1
    assert preprocess(cfg).mean == FASHION_MNIST_MEAN
    to_train_job(cfg, "mem://cache", "run", "mem://runs").build_model()  # the model's own checks agree


def test_defaults_without_a_file() -> None:
    assert load_config(None) == PipelineConfig()
    assert load_config(None).output_root == "outputs"


def test_overrides_parse_yaml_scalars_lists_and_nested_dicts() -> None:
    cfg = load_config(TINY, [
        "train.epochs=3", "train.blr=1e-3", "train.use_gpu=true", "model.att_tau=2", "base.checkpoint=null",
        "preprocess.norm=custom", "preprocess.mean=[0.5]", "preprocess.std=[0.25]",
        "model.timm_overrides.qkv_bias=false",
        "train.run_name=my-run", "train.epochs=4",
    ])
    assert cfg.train.epochs == 4 and cfg.train.blr == 1e-3 and cfg.train.use_gpu is True
    assert cfg.model.att_tau == 2.0 and isinstance(cfg.model.att_tau, float)
    assert cfg.base.checkpoint is None and cfg.train.run_name == "my-run"
    assert cfg.model.timm_overrides == {"in_chans": 1, "qkv_bias": False}
    assert preprocess(cfg).mean == (0.5,) and preprocess(cfg).std == (0.25,)
    assert load_config(None, ["base.timm_overrides.in_chans=1", "model.timm_overrides.in_chans=1",
                              "preprocess.norm=fashion_mnist"]).base.timm_overrides == {"in_chans": 1}


def test_float_exponent_without_dot_in_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  blr: 1e-3\n  min_lr: 5E-6\n")
    cfg = load_config(path)
    assert cfg.train.blr == 1e-3 and cfg.train.min_lr == 5e-6


BAD = [
    # (overrides, the dotted key the error line must start with, a fragment of the message)
    (["model.topkk=3"], "model.topkk", "unknown key (did you mean model.topk?)"),
    (["trian.epochs=3"], "trian", "unknown key (did you mean train?)"),
    (["train.epochs=three"], "train.epochs", "expected int, got str 'three'"),
    (["train.epochs=2.5"], "train.epochs", "expected int"),
    (["train.use_gpu=3"], "train.use_gpu", "expected bool"),
    (["data.limit=many"], "data.limit", "expected int or null"),
    (["preprocess.crop_scale=[0.2, x]"], "preprocess.crop_scale[1]", "expected float"),
    (["train=3"], "train", "expected a mapping"),
    (["train.epochs.x=1"], "train.epochs", "not a section"),
    (["train.epochs"], "train.epochs", "key.sub=value"),
    (["model.mask_ratio=1.0"], "model.mask_ratio", "[0, 1)"),
    (["model.mask_ratio=-0.1"], "model.mask_ratio", ">= 0"),
    (["extract.unit_size=0"], "extract.unit_size", ">= 1"),
    (["model.att_tau=0"], "model.att_tau", "> 0"),
    (["name=my run"], "name", "directory name"),
    (["model.topk=9", "extract.k_max=8"], "model.topk", "9 > extract.k_max 8"),
    (["extract.k_max=65", "model.topk=4"], "extract.k_max", "64 patches"),
    (["extract.last_layers=4"], "extract.last_layers", "depth 3"),
    (["train.global_batch=100", "train.accum_steps=4"], "train.global_batch", "num_workers × train.accum_steps"),
    (["model.decoder_dim=66"], "model.decoder_dim", "decoder_heads 4"),
    (["model.arch=vit_base_patch16_224", "model.timm_overrides={in_chans: 1}"], "model.arch", "img_size 224"),
    (["model.timm_overrides.in_chans=3"], "model.timm_overrides.in_chans", "in_chans 3 differs"),
    (["model.timm_overrides.patch_size=8"], "model.timm_overrides.patch_size", "L=16"),
    (["base.timm_overrides.depth=two"], "base.timm_overrides.depth", "positive int"),
    (["base.timm_overrides.colour=1"], "base.timm_overrides", "unsupported ViT override"),
    (["base.arch=vit_huge_patch14_224"], "base.arch", "expected one of"),
    (["model.adapters=bth"], "model.adapters", "did you mean 'both'?"),
    (["model.feature_norm=layer"], "model.feature_norm", "expected one of"),
    (["train.target_source=disk"], "train.target_source", "expected one of 'cache', 'online'"),
    (["data.source=csv"], "data.source", "expected one of"),
    (["extract.compressor=lz4"], "extract.compressor", "expected one of"),
    (["preprocess.norm=imagenet"], "preprocess.norm", "in_chans=1"),
    (["preprocess.norm=custom"], "preprocess.mean", "required"),
    (["preprocess.norm=custom", "preprocess.mean=[0.5, 0.5]", "preprocess.std=[0.2]"], "preprocess.mean",
     "in_chans=1"),
    (["preprocess.mean=[0.5]"], "preprocess.mean", "only used with"),
    (["preprocess.crop_scale=[0.5, 0.2]"], "preprocess.crop_scale", "min <= max"),
]


@pytest.mark.parametrize(("overrides", "key", "fragment"), BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_config_names_the_dotted_key(overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    lines = [line for line in err.value.errors if line.startswith(key + ":")]
    assert lines, err.value.errors
    assert any(fragment in line for line in lines), err.value.errors
    assert str(err.value).splitlines() == err.value.errors


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["model.topkk=1", "train.epochs=x", "model.adapters=no", "model.topk=9"])
    keys = [line.split(":")[0] for line in err.value.errors]
    assert keys == ["model.topkk", "model.adapters", "train.epochs", "model.topk"]
    assert isinstance(err.value, ValueError)


def test_a_field_that_failed_its_own_check_does_not_cascade() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["extract.k_max=zero"])
    assert [line.split(":")[0] for line in err.value.errors] == ["extract.k_max"]


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: 2\n   blr: [1\nmodel: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "malformed YAML" in str(err.value)
    assert f"{path}:3:" in str(err.value)


def test_non_mapping_file_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == PipelineConfig()


def test_secrets_never_reach_the_resolved_config() -> None:
    secrets = ["AKIAFAKEKEYID", "sUp3rS3cretValue", "hunter2pass", "sig-0123456789", "sas-sig-4242", "AKIAV2KEYID"]
    cfg = load_config(TINY, [
        f"base.checkpoint=s3://{secrets[0]}:{secrets[1]}@bucket/base.pth",
        f"output_root=https://alice:{secrets[2]}@example.invalid/tec?X-Amz-Signature={secrets[3]}&part=1",
        f"data.test_path=https://acct.blob.core.windows.net/c/t10k.gz?sp=r&sig={secrets[4]}&AWSAccessKeyId={secrets[5]}",
    ])
    dumped = dump_yaml(cfg) + json.dumps(resolved_dict(cfg))
    for secret in secrets:
        assert secret not in dumped
    resolved = resolved_dict(cfg)
    assert resolved["base"]["checkpoint"] == "s3://bucket/base.pth"
    assert resolved["output_root"] == "https://example.invalid/tec?X-Amz-Signature=<redacted>&part=1"
    assert resolved["data"]["test_path"].endswith("t10k.gz?sp=r&sig=<redacted>&AWSAccessKeyId=<redacted>")
    # the loaded config itself keeps the real values: only what is written out is redacted
    assert secrets[1] in cfg.base.checkpoint


def test_redact_hides_secret_named_keys_at_any_depth() -> None:
    data = {"storage": {"aws_secret_access_key": "s1", "Password": "s2", "session_token": "s3",
                        "client_kwargs": [{"AWS_ACCESS_KEY_ID": "s4", "region_name": "eu-west-1"}]},
            "credentials_file": "s5", "url": "s3://k:s6@b/x", "epochs": 3, "checkpoint_key": "teacher"}
    out = json.dumps(redact(data))
    for secret in ("s1", "s2", "s3", "s4", "s5", "s6"):
        assert f'"{secret}"' not in out and ":s6@" not in out
    assert "eu-west-1" in out and '"teacher"' in out and redact(data)["epochs"] == 3


def test_dump_yaml_round_trips() -> None:
    cfg = load_config(TINY, ["train.blr=1e-3", "preprocess.crop_ratio=[0.5, 2]"])
    text = dump_yaml(cfg)
    assert yaml.safe_load(text) == resolved_dict(cfg)
    assert load_config(None, [f"{k}={json.dumps(v)}" for k, v in yaml.safe_load(text).items()]) == cfg


def test_to_extract_job_matches_the_config() -> None:
    cfg = load_config(TINY, ["extract.seed=7", "base.checkpoint_key=teacher", "extract.compressor=bitshuffle"])
    job = to_extract_job(cfg, "c", "m", "b")
    ex = cfg.extract
    assert (job.cache_url, job.manifest_url, job.checkpoint_url) == ("c", "m", "b")
    assert job.timm_kwargs == base_timm_kwargs(cfg)
    assert (job.views_per_image, job.view_seed, job.last_layers, job.k_max, job.unit_size, job.batch_size) == \
        (ex.views_per_image, 7, ex.last_layers, ex.k_max, ex.unit_size, ex.batch_size)
    assert (job.checkpoint_key, job.compressor, job.precision) == ("teacher", "bitshuffle", cfg.extract.precision)
    assert job.preprocess == Preprocess.fashion_mnist(32, 1)


def test_to_train_job_maps_every_field() -> None:
    cfg = load_config(TINY, ["train.max_steps=5", "train.warmup_epochs=0.5", "model.adapters=encoder",
                             "train.target_source=online", "extract.seed=3"])
    job = to_train_job(cfg, None, "r1", "/tmp/runs", manifest_url="m.parquet", checkpoint_url="b.pth")
    assert isinstance(job, TrainJob)
    for section, skip in ((cfg.model, {"arch", "timm_overrides"}), (cfg.train, {"run_name"})):
        for f in dataclasses.fields(section):
            if f.name not in skip:
                value = getattr(section, f.name)  # a nested section (train.local_cache) maps onto a plain dict
                assert getattr(job, f.name) == (dataclasses.asdict(value) if dataclasses.is_dataclass(value)
                                                else value), f.name
    assert (job.run_name, job.storage_path, job.cache_url, job.manifest_url, job.checkpoint_url) == \
        ("r1", "/tmp/runs", None, "m.parquet", "b.pth")
    assert job.timm_kwargs == model_timm_kwargs(cfg) and job.base_timm_kwargs == base_timm_kwargs(cfg)
    assert job.preprocess == preprocess(cfg).to_dict()
    assert (job.views_per_image, job.view_seed, job.k_max, job.last_layers) == (2, 3, 8, 2)
    assert TrainJob.from_dict(job.to_dict()) == job  # the job's own validation passes on a round trip
    mapped = ({f.name for f in dataclasses.fields(ModelConfig)} | {f.name for f in dataclasses.fields(TrainConfig)}
              | {"run_name", "storage_path", "timm_kwargs", "base_timm_kwargs", "preprocess", "cache_url",
                 "manifest_url", "checkpoint_url", "views_per_image", "view_seed", "last_layers", "k_max",
                 "base_precision", "uri_policy", "codec", "base_checkpoint_key"})
    assert {f.name for f in dataclasses.fields(TrainJob)} - mapped == {"log_indices", "extra"}
    assert job.base_precision == cfg.extract.precision == "auto" and job.codec == cfg.extract.codec == "float16"
    assert job.base_checkpoint_key is None and to_train_job(load_config(TINY, ["base.checkpoint_key=student"]), "c",
                                                            "r2", "/tmp/runs").base_checkpoint_key == "student"
    assert UriPolicy(**job.uri_policy) == UriPolicy.of(cfg.data)


def test_default_run_name() -> None:
    cfg = load_config(TINY)
    assert default_run_name(cfg, now=0).startswith("tiny-19")
    assert default_run_name(load_config(TINY, ["train.run_name=fixed"])) == "fixed"


@pytest.mark.parametrize(("override", "key"), [
    ("base.pretrain.epochs=1 base.pretrain.global_batch=99", "base.pretrain.global_batch"),  # checked when it runs
    ("base.pretrain.decoder_dim=66", "base.pretrain.decoder_dim"),
    ("base.pretrain.mask_ratio=1.0", "base.pretrain.mask_ratio"),
    ("base.pretrain.epochs=-1", "base.pretrain.epochs"),
    ("base.pretrain.epoch=3", "base.pretrain.epoch"),
])
def test_bad_pretrain_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override.split())


def test_pretrain_job_is_a_pixel_mae_of_the_base_architecture():
    cfg = load_config(None, ["base.pretrain.epochs=5", "train.num_workers=1"])
    job = to_pretrain_job(cfg, run_name="mae", storage_path="/tmp/x", manifest_url="/tmp/m.parquet")
    assert job.target_source == "pixel" and job.timm_kwargs == job.base_timm_kwargs == base_timm_kwargs(cfg)
    assert (job.adapters, job.feature_norm, job.attention_target) == ("none", "channel", False)
    assert job.views_per_image == 5 and job.epochs == 5  # a fresh view of every image each epoch


@pytest.mark.parametrize("value", ["..", ".", ".hidden", "a/b", "../evil", "a..b", "-x", "a b", "é", "x" * 129])
@pytest.mark.parametrize("key", ["name", "train.run_name"])
def test_names_that_become_directories_are_one_safe_component(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [f"{key}={json.dumps(value)}"])
    assert info.value.errors[0].startswith(f"{key}: ") and "directory name" in info.value.errors[0]


def test_valid_names_pass_and_jobs_refuse_a_run_name_that_is_not_one_directory() -> None:
    assert check_name("tiny-2024.01_a", "--run-name") == "tiny-2024.01_a"
    assert load_config(TINY, ["name=A.b_c-1", "train.run_name=r1.v2"]).train.run_name == "r1.v2"
    cfg = load_config(TINY)
    for bad in ("../escape", "", ".ray", "runs/x"):
        with pytest.raises(ConfigError, match=r"^run_name: .*directory name"):
            to_train_job(cfg, "mem://cache", bad, "mem://runs")
        with pytest.raises(ConfigError, match=r"^run_name: "):
            to_pretrain_job(cfg, run_name=bad, storage_path="mem://bases", manifest_url="mem://m.parquet")
    with pytest.raises(ConfigError, match=r"^--run-name: "):
        check_name("../escape", "--run-name")
