"""Config files that start from another one (``_base_``): merging, chains, cycles, bad paths, shipped overlays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, resolved_dict

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OVERLAYS = ["imagenet_vitb_mae", "imagenet_vitb_ibot", "imagenet_vitl_mae"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_imagenet_overlays_resolve_exactly_as_the_full_files_did(name: str) -> None:
    """The fixtures hold each config's resolved dict from before it became an overlay of configs/base/."""
    path = REPO / "configs" / f"{name}.yaml"
    assert "_base_:" in path.read_text() and len(path.read_text().splitlines()) <= 20
    expected = json.loads((FIXTURES / f"{name}.resolved.json").read_text())
    assert resolved_dict(load_config(path)) == expected


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_chain_of_bases_merges_deeply_the_includer_wins_and_overrides_come_last(tmp_path: Path) -> None:
    _write(tmp_path / "common" / "root.yaml",
           "name: root\ntrain:\n  epochs: 3\n  blr: 2.0e-4\nbase:\n  pretrain:\n    epochs: 2\n    seed: 5\n")
    _write(tmp_path / "common" / "mid.yaml",
           "_base_: root.yaml\ntrain:\n  epochs: 4\nbase:\n  pretrain:\n    seed: 6\n")  # relative to common/
    top = _write(tmp_path / "top.yaml", "_base_: common/mid.yaml\nname: top\ntrain:\n  seed: 9\n")
    cfg = load_config(top)
    assert cfg.name == "top"
    assert (cfg.train.epochs, cfg.train.blr, cfg.train.seed) == (4, 2.0e-4, 9)
    assert (cfg.base.pretrain.epochs, cfg.base.pretrain.seed) == (2, 6)  # nested mappings merge key by key
    cfg = load_config(top, ["train.epochs=7", "base.pretrain.epochs=1"])
    assert (cfg.train.epochs, cfg.base.pretrain.epochs, cfg.base.pretrain.seed) == (7, 1, 6)


def test_a_value_of_the_includer_replaces_the_base_value_whole(tmp_path: Path) -> None:
    _write(tmp_path / "b.yaml", "preprocess:\n  norm: fashion_mnist\n  crop_scale: [0.3, 1.0]\n"
                                "base:\n  timm_overrides: {in_chans: 1, depth: 2}\n")
    top = _write(tmp_path / "t.yaml", "_base_: b.yaml\npreprocess:\n  crop_scale: [0.5, 0.9]\n"
                                      "base:\n  timm_overrides: {depth: 3}\nmodel:\n  timm_overrides: {in_chans: 1}\n")
    cfg = load_config(top)
    assert cfg.preprocess.crop_scale == [0.5, 0.9] and cfg.preprocess.norm == "fashion_mnist"
    assert cfg.base.timm_overrides == {"in_chans": 1, "depth": 3}  # a mapping value merges too


def test_errors_in_a_merged_config_keep_their_dotted_keys(tmp_path: Path) -> None:
    _write(tmp_path / "b.yaml", "train:\n  epochz: 3\n")
    top = _write(tmp_path / "t.yaml", "_base_: b.yaml\nmodel:\n  topk: 99\n")
    with pytest.raises(ConfigError) as err:
        load_config(top)
    keys = [line.split(":")[0] for line in err.value.errors]
    assert "train.epochz" in keys and "model.topk" in keys


def test_a_cycle_of_bases_is_refused_naming_the_files(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", "_base_: b.yaml\nname: a\n")
    b = _write(tmp_path / "b.yaml", "_base_: a.yaml\nname: b\n")
    with pytest.raises(ConfigError) as err:
        load_config(a)
    (line,) = err.value.errors
    assert "_base_ cycle" in line and str(a) in line and str(b) in line
    self_loop = _write(tmp_path / "s.yaml", "_base_: s.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(self_loop)


def test_a_missing_base_names_that_file_and_the_file_including_it(tmp_path: Path) -> None:
    top = _write(tmp_path / "t.yaml", "_base_: nowhere/absent.yaml\nname: t\n")
    with pytest.raises(ConfigError) as err:
        load_config(top)
    (line,) = err.value.errors
    assert line.startswith(f"{tmp_path / 'nowhere' / 'absent.yaml'}: cannot read config file")
    assert f"the _base_ of {top}" in line


def test_a_bad_base_value_or_base_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    top = _write(tmp_path / "t.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: _base_: expected a file path"):
        load_config(top)
    _write(tmp_path / "list.yaml", "- 1\n")
    top = _write(tmp_path / "u.yaml", "_base_: list.yaml\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping at the top level"):
        load_config(top)
    _write(tmp_path / "broken.yaml", "train: [1\n")
    top = _write(tmp_path / "v.yaml", "_base_: broken.yaml\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: malformed YAML.*the _base_ of"):
        load_config(top)
