"""Evaluation: every checkpoint format gives the same features; the protocols run on any labelled source."""

import io
import json
import os
import sys
import types

import fsspec
import numpy as np
import pytest
import timm
import torch

from pipeline.commands import evaluate_cli
from pipeline.evaluate import evaluate, extract_features, format_results, load_encoder
from pipeline.labelled import LabelledData
from run_pipeline import main
from stages.images import ImageSource
from stages.manifest import manifest_from_idx
from stages.views import Preprocess, build_view
from tec_model import CheckpointError, export_encoder, vit_kwargs
from tests.fixtures.data import FMNIST_TRAIN_IMAGES, sample_images
from tests.fixtures.models import BASE_ARCH, NEW_ARCH, make_base, make_tec
from tests.pipeline.test_labelled import TINY, folder_cfg, image_tree, make_trees, uri_list

FMNIST_TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
KWARGS = vit_kwargs(NEW_ARCH, in_chans=1)  # vit_pico: 48 wide, 3 blocks
PRE = Preprocess.fashion_mnist(32)


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_eval_view_is_build_view_of_the_full_image(fmnist_dir):
    """The pixels fed to the encoder are build_view(image, (0, 0, H, W, 0)); arrays and manifests agree."""
    images = sample_images(5)
    model = timm.create_model(NEW_ARCH, num_classes=0, in_chans=1).eval()
    seen = []
    model.patch_embed.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    feats = extract_features(model, images, PRE, batch_size=3)
    expected = torch.stack([build_view(img[:, :, None], (0, 0, 28, 28, 0), 32, PRE.mean, PRE.std) for img in images])
    assert torch.equal(torch.cat(seen), expected) and feats.shape == (5, 48)
    manifest = manifest_from_idx(fmnist_dir / FMNIST_TRAIN_IMAGES, limit=5)
    assert torch.equal(extract_features(model, manifest, PRE, source=ImageSource(1)), feats)
    tokens = model.forward_features(expected)
    assert torch.equal(extract_features(model, images, PRE, feature="mean"), tokens[:, 1:].mean(1))


def test_every_checkpoint_format_gives_identical_features(tmp_path):
    """TEC export (as encoder.pth + encoder.json), TEC training state, MAE, DINO and timm files: same features."""
    tec = make_tec(make_base(in_chans=1, seed=3), seed=4)
    with torch.no_grad():
        tec.input_adapter.fc2.bias.add_(0.5)  # a non-trivial adapter, folded into the cls token on export
    sd = export_encoder(tec)
    mae_extras = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 48)}
    files = {
        "timm.pth": sd,
        "mae.pth": {"model": {**sd, **mae_extras}, "epoch": 9},
        "dino.pth": {"teacher": {f"module.backbone.{k}": v for k, v in sd.items()}},
        "tec_state.pth": {"model": tec.state_dict()},
    }
    images = sample_images(16)
    reference = timm.create_model(NEW_ARCH, num_classes=0, in_chans=1)
    reference.load_state_dict(sd, strict=True)
    expected = extract_features(reference.eval(), images, PRE)
    for name, obj in files.items():
        (tmp_path / name).write_bytes(saved(obj))
        assert torch.equal(extract_features(load_encoder(str(tmp_path / name), KWARGS), images, PRE), expected), name
    with fsspec.open("memory://eval-test/export/encoder.pth", "wb") as f:  # any fsspec URL, kwargs from the export
        f.write(saved(sd))
    with fsspec.open("memory://eval-test/export/encoder.json", "w") as f:
        json.dump({"timm_kwargs": KWARGS}, f)
    exported = load_encoder("memory://eval-test/export/encoder.pth", None)
    assert not exported.training and not any(p.requires_grad for p in exported.parameters())
    assert torch.equal(extract_features(exported, images, PRE), expected)


def test_pickled_callable_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(saved({"model": timm.create_model(NEW_ARCH, in_chans=1).state_dict(), "hook": os.system}))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_encoder(str(path), KWARGS)


def test_random_init_encoder_beats_chance_on_fashion_mnist(fmnist_dir, tmp_path):
    """Pixels carry class information: a random-init vit_pico's frozen features are far above chance (0.1).

    Measured with 500 train / 200 test images over init seeds 0-3: k-NN 0.41-0.46, linear 0.51-0.53 (vit_nano:
    0.44-0.45 / 0.56-0.62). The test set's largest class is 27/200 = 0.135; one standard error is ~0.035, so the
    thresholds 0.3 / 0.35 sit about 3 standard errors below every measurement.
    """
    torch.manual_seed(0)
    path = tmp_path / "random.pth"
    path.write_bytes(saved(timm.create_model(NEW_ARCH, num_classes=0, in_chans=1).state_dict()))
    result = evaluate(str(path), KWARGS, train_images_idx=str(fmnist_dir / FMNIST_TRAIN_IMAGES),
                      test_images_idx=str(fmnist_dir / FMNIST_TEST_IMAGES), n_train=500, n_test=200,
                      preprocess=PRE, threads=1)
    assert (result.n_train, result.n_test, result.embed_dim, result.feature) == (500, 200, 48, "cls")
    assert result.knn_top1 > 0.3 and result.linear_top1 > 0.35, result
    assert np.isfinite(result.linear["loss"]) and result.seconds > 0


# ------------------------------------------------------------------ any labelled data: evaluate_cli and the command
@pytest.fixture
def trees(tmp_path):
    """ImageFolder train (3 x 12) / val (3 x 6) trees of bright, dark and striped 16x16 PNGs."""
    return make_trees(tmp_path)


def random_checkpoint(path, arch: str = NEW_ARCH, seed: int = 0) -> str:
    """A random-init timm ViT state dict (1 input channel) written to ``path``."""
    torch.manual_seed(seed)
    path.write_bytes(saved(timm.create_model(arch, num_classes=0, in_chans=1).state_dict()))
    return str(path)


def test_image_folder_and_its_manifest_beat_chance_alike(trees, capsys):
    """Bright / dark / striped PNGs (3 classes: chance 1/3): a random vit_pico's frozen features separate them, and
    the Parquet manifest over the same files (through the command) gives exactly the same answers."""
    tmp, train, val = trees
    ckpt = random_checkpoint(tmp / "random.pth")
    folder = evaluate_cli(folder_cfg(tmp), ckpt)
    assert (folder["n_train"], folder["n_test"], folder["num_classes"]) == (36, 18, 3)
    assert folder["knn_top1"] > 0.6 and folder["linear_top1"] > 0.6, folder
    assert folder["protocols"] == ["knn", "linear"] and "image_folder" in folder["data"]
    capsys.readouterr()
    main(["evaluate", "--config", str(TINY), f"output_root={tmp / 'out'}", "data.source=uri_list",
          f"data.path={uri_list(tmp / 'train.parquet', train)}", f"data.test_path={uri_list(tmp / 'val.parquet', val)}",
          "--checkpoint", ckpt, "--protocols", "knn,linear", "--num-classes", "3"])
    out = capsys.readouterr()
    listed = json.loads(out.out)
    assert (listed["knn_top1"], listed["linear_top1"]) == (folder["knn_top1"], folder["linear_top1"])
    table = out.err.splitlines()
    table = table[table.index("protocol  top-1"):]  # after any log lines
    assert table[:4] == ["protocol  top-1", "--------  ------", f"knn       {folder['knn_top1']:.4f}",
                         f"linear    {folder['linear_top1']:.4f}"], table


def test_protocols_flag(trees, monkeypatch):
    """knn alone skips the probe; unknown names are refused; fine-tuning goes to pipeline.finetune.finetune_cli with
    the same labelled data, or is refused by name when the build lacks that module."""
    tmp, _, _ = trees
    cfg, ckpt = folder_cfg(tmp), random_checkpoint(tmp / "random.pth")
    knn_only = evaluate_cli(cfg, ckpt, protocols="knn")
    assert knn_only["knn_top1"] > 0.6 and knn_only["linear_top1"] is None and knn_only["linear"] == {}
    with pytest.raises(ValueError, match=r"--protocols knn,lineer: expected a comma list of knn, linear, finetune.*"
                                         r"unknown: lineer"):
        evaluate_cli(cfg, ckpt, protocols="knn,lineer")
    monkeypatch.setitem(sys.modules, "pipeline.finetune", None)  # a build without the module
    with pytest.raises(ValueError, match="--protocols peft_both: fine-tuning protocols are not available in this"):
        evaluate_cli(cfg, ckpt, protocols="knn,peft_both")
    calls = []
    fake = types.ModuleType("pipeline.finetune")
    fake.finetune_cli = lambda *args: calls.append(args) or {"test_top1": 0.5, "epochs": 1}
    monkeypatch.setitem(sys.modules, "pipeline.finetune", fake)
    results = evaluate_cli(cfg, ckpt, "base", n_train=9, protocols=["peft_prompt"])
    assert results["peft_prompt"] == {"test_top1": 0.5, "epochs": 1} and results["knn_top1"] is None
    (got_cfg, got_ckpt, which, protocol, data), = calls
    assert (got_cfg, got_ckpt, which, protocol) == (cfg, ckpt, "base", "peft_prompt")
    assert isinstance(data, LabelledData) and (data.train.num_rows, data.test.num_rows, data.num_classes) == (9, 18, 3)
    assert "peft_prompt  0.5000" in format_results(results)


def test_the_configs_base_checkpoint_evaluated_as_the_base_is_read_at_its_forced_entry(trees, monkeypatch):
    """base.checkpoint_key reaches ``evaluate --which base`` of that file (any other file, or ``--which model``:
    auto-detection)."""
    import pipeline.evaluate as E

    tmp, _, _ = trees
    ckpt = random_checkpoint(tmp / "base.pth", arch=BASE_ARCH)
    cfg = folder_cfg(tmp, f"base.checkpoint={ckpt}", "base.checkpoint_key=student")
    keys = []

    def capture(*args, checkpoint_key=None, **kwargs):
        keys.append(checkpoint_key)
        raise StopIteration

    monkeypatch.setattr(E, "evaluate", capture)
    for checkpoint, which in ((ckpt, "base"), (str(tmp / "other.pth"), "base"), (ckpt, "model")):
        with pytest.raises(StopIteration):
            evaluate_cli(cfg, checkpoint, which, protocols="knn")
    assert keys == ["student", None, None]


def test_checkpoint_of_another_architecture_names_it_and_the_mismatch(trees):
    tmp, _, _ = trees
    ckpt = random_checkpoint(tmp / "nano.pth", arch=BASE_ARCH)  # 96 wide; the config's model is vit_pico (48)
    expected = (r"nano.pth: checkpoint does not fit the architecture — shape mismatches: blocks.0.attn.proj.bias: "
                r"checkpoint \(96,\) vs model \(48,\).*embed_dim=48.*--which model loads it as the config's model.arch "
                r"vit_pico_patch4_32")
    with pytest.raises(CheckpointError, match=expected):
        evaluate_cli(folder_cfg(tmp), ckpt, n_train=6, n_test=3)


def test_finetune_protocol_runs_pipeline_finetune(tmp_path):
    """--protocols knn,finetune: the frozen k-NN and a real (1-epoch, in-process) fine-tuning run on the same splits,
    its results under 'finetune' and in the table."""
    for split, n in (("train", 8), ("val", 4)):
        image_tree(str(tmp_path / split), n, seed=n)
    cfg = folder_cfg(tmp_path, "train.num_workers=0", "train.loader_workers=0", "finetune.epochs=1",
                     "finetune.batch_size=8")
    results = evaluate_cli(cfg, random_checkpoint(tmp_path / "random.pth"), protocols="knn,finetune")
    tuned = results["finetune"]
    assert results["protocols"] == ["knn", "finetune"] and results["knn_top1"] is not None
    assert tuned["complete"] and tuned["n_train"] == 24 and tuned["data"] == results["data"]
    assert f"finetune  {tuned['test_top1']:.4f}" in format_results(results)
