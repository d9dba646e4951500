"""Labelled splits for evaluation: every data source, the train tree's class indices, the input policy, clear errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import PipelineConfig, load_config
from pipeline.labelled import (
    ClassMismatchError,
    LabelledDataError,
    NoTestSplitError,
    UnlabelledError,
    labelled_splits,
    labels_of,
)
from stages.uri_policy import UriPolicyError

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
CLASSES = ("bright", "dark", "striped")  # sorted: labels 0, 1, 2


def pattern(name: str, rng: np.random.Generator, side: int = 16) -> np.ndarray:
    """A uint8 (side, side) image of a visually separable class: bright noise, dark noise or horizontal stripes."""
    if name == "bright":
        return rng.integers(180, 256, (side, side), dtype=np.uint8)
    if name == "dark":
        return rng.integers(0, 70, (side, side), dtype=np.uint8)
    rows = (np.arange(side) // 2 % 2 * 255).astype(np.uint8)  # 2-pixel stripes, random phase and contrast
    img = np.repeat(np.roll(rows, int(rng.integers(0, 4)))[:, None], side, axis=1).astype(np.int16)
    return np.clip(img + rng.integers(-30, 31, (side, side)), 0, 255).astype(np.uint8)


def image_tree(root: str, per_class: int, classes: tuple[str, ...] = CLASSES, seed: int = 0) -> list[tuple[str, int]]:
    """Write real PNGs as an ImageFolder tree ``root/<class>/<i>.png`` (any fsspec URL); returns (uri, label) rows
    in manifest order (label = position in ``classes``, which must be sorted)."""
    rng = np.random.default_rng(seed)
    fs, base = fsspec.core.url_to_fs(root)
    rows = []
    for label, name in enumerate(classes):
        fs.makedirs(f"{base}/{name}", exist_ok=True)
        for i in range(per_class):
            path = f"{base}/{name}/{i:03d}.png"
            with fs.open(path, "wb") as f:
                Image.fromarray(pattern(name, rng)).save(f, format="PNG")
            rows.append((fs.unstrip_protocol(path), label))
    return rows


def uri_list(path: Path, rows: list[tuple[str, int]], labels: bool = True) -> str:
    """A Parquet manifest (``uri`` and, if ``labels``, ``label``) over ``rows``."""
    cols = {"uri": [u for u, _ in rows]} | ({"label": [lab for _, lab in rows]} if labels else {})
    pq.write_table(pa.table(cols), path)
    return str(path)


def tiny_cfg(tmp_path: Path, *overrides: str) -> PipelineConfig:
    """configs/tiny.yaml with its output root in ``tmp_path`` and ``overrides``."""
    return load_config(str(TINY), [f"output_root={tmp_path / 'out'}", *overrides])


def folder_cfg(root: Path, *overrides: str, test: str = "val") -> PipelineConfig:
    """The tiny config over the ImageFolder trees ``root/train`` and ``root/<test>``."""
    return tiny_cfg(root, "data.source=image_folder", f"data.path={root / 'train'}", f"data.test_path={root / test}",
                    *overrides)


def list_cfg(root: Path, train: list, val: list, val_labels: bool = True) -> PipelineConfig:
    """The tiny config over Parquet manifests of the rows ``train`` and ``val``."""
    return tiny_cfg(root, "data.source=uri_list", f"data.path={uri_list(root / 'train.parquet', train)}",
                    f"data.test_path={uri_list(root / 'val.parquet', val, val_labels)}")


def make_trees(root: Path) -> tuple[Path, list, list]:
    """Train (3 classes x 12) and val (3 classes x 6) trees of 16x16 PNGs; (root, train rows, val rows)."""
    return root, image_tree(str(root / "train"), 12, seed=1), image_tree(str(root / "val"), 6, seed=2)


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, list, list]:
    return make_trees(tmp_path)


def test_image_folder_splits_are_the_trees_manifests(trees):
    tmp, train, val = trees
    cfg = folder_cfg(tmp)
    data = labelled_splits(cfg, None, None)
    assert data.num_classes == 3 and data.train.num_rows == 36 and data.test.num_rows == 18
    assert list(zip(data.train.column("uri").to_pylist(), labels_of(data.train), strict=True)) == train
    assert list(zip(data.test.column("uri").to_pylist(), labels_of(data.test), strict=True)) == val
    assert "image_folder" in data.source_desc and str(tmp / "val") in data.source_desc


def test_val_classes_take_the_train_trees_indices(tmp_path):
    """A val tree holding only 'dark' and 'striped' gets labels 1 and 2 (the train tree's), not its own 0 and 1."""
    image_tree(str(tmp_path / "train"), 2)
    image_tree(str(tmp_path / "val"), 2, classes=("dark", "striped"))
    cfg = folder_cfg(tmp_path)
    data = labelled_splits(cfg, None, None)
    assert labels_of(data.test).tolist() == [1, 1, 2, 2] and data.num_classes == 3
    uris = data.test.column("uri").to_pylist()
    assert all(f"/{CLASSES[lab]}/" in u for u, lab in zip(uris, labels_of(data.test), strict=True))


def test_val_class_missing_from_train_is_named(tmp_path):
    image_tree(str(tmp_path / "train"), 1)
    image_tree(str(tmp_path / "val"), 1, classes=("bright", "zebra"))
    cfg = folder_cfg(tmp_path)
    with pytest.raises(ClassMismatchError, match=r"data.test_path .*val.*\['zebra'\] are not classes of data.path"):
        labelled_splits(cfg, None, None)


def test_uri_list_gives_the_same_splits_and_subsets_are_drawn_across_classes(trees):
    tmp, train, val = trees
    cfg = list_cfg(tmp, train, val)
    whole = labelled_splits(cfg, None, None)
    assert whole.num_classes == 3 and whole.train.column("uri").to_pylist() == [u for u, _ in train]
    sub = labelled_splits(cfg, 10, 6)
    assert (sub.train.num_rows, sub.test.num_rows) == (10, 6)
    assert sub.train.column("index").to_pylist() == list(range(10))
    assert len(set(labels_of(sub.train))) > 1  # not the first 10 rows (all 'bright')
    assert set(sub.train.column("uri").to_pylist()) <= set(whole.train.column("uri").to_pylist())
    assert labelled_splits(cfg, 10, 6).train.equals(sub.train)  # deterministic


def test_no_test_path(tmp_path):
    with pytest.raises(NoTestSplitError, match=r"data.test_path is not set.*data.source idx"):
        labelled_splits(tiny_cfg(tmp_path, "data.test_path=null"), 10, 10)


def test_unlabelled_uri_list_names_the_file_and_the_fix(trees):
    tmp, train, val = trees
    cfg = list_cfg(tmp, train, val, val_labels=False)
    with pytest.raises(UnlabelledError, match=r"data.test_path .*val.parquet has no labels.*add an integer 'label'"):
        labelled_splits(cfg, None, None)


def write_idx_images(path: Path, n: int) -> None:
    """An IDX images file (gzip) of n random 28x28 images, without a labels file."""
    data = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    path.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, n, 28, 28) + data.tobytes()))


def test_idx_splits_unlabelled_or_remote(tmp_path):
    """An IDX file without its labels file says which file to add; a remote IDX path is refused by name."""
    write_idx_images(tmp_path / "train-images-idx3-ubyte.gz", 4)
    write_idx_images(tmp_path / "t10k-images-idx3-ubyte.gz", 4)
    cfg = tiny_cfg(tmp_path, f"data.path={tmp_path / 'train-images-idx3-ubyte.gz'}",
                   f"data.test_path={tmp_path / 't10k-images-idx3-ubyte.gz'}")
    with pytest.raises(UnlabelledError, match=r"data.path .*train-images.* has no labels.*train-labels-idx1-ubyte.gz"):
        labelled_splits(cfg, None, None)
    remote = tiny_cfg(tmp_path, "data.path=memory://fmnist/train-images-idx3-ubyte.gz")
    with pytest.raises(LabelledDataError, match=r"data.path memory://fmnist/.*: data.source idx reads local IDX files"):
        labelled_splits(remote, None, None)


def test_test_labels_outside_the_train_classes(trees):
    tmp, train, val = trees
    val[0] = (val[0][0], 5)
    cfg = list_cfg(tmp, train, val)
    with pytest.raises(ClassMismatchError, match=r"val.parquet: labels \[5\] are outside the 3 classes of data.path"):
        labelled_splits(cfg, None, None)


def test_num_classes_that_disagrees(trees):
    tmp, train, val = trees
    folder = folder_cfg(tmp)
    assert labelled_splits(folder, None, None, num_classes=3).num_classes == 3
    with pytest.raises(ClassMismatchError, match=r"--num-classes 4 disagrees with data.path .*3 class directories"):
        labelled_splits(folder, None, None, num_classes=4)
    listed = list_cfg(tmp, train, val)
    with pytest.raises(ClassMismatchError, match=r"--num-classes 2 disagrees .*labels go up to 2"):
        labelled_splits(listed, None, None, num_classes=2)


def test_fsspec_trees_under_the_input_policy(tmp_path):
    """A memory:// tree is refused by the default policy (naming the setting) and read once its scheme is allowed."""
    image_tree("memory://labelled-test/train", 2)
    image_tree("memory://labelled-test/val", 1)
    paths = ["data.source=image_folder", "data.path=memory://labelled-test/train",
             "data.test_path=memory://labelled-test/val"]
    refused = r"memory:///?labelled-test/train/bright/000.png: scheme 'memory' is not allowed.*data.allowed_schemes"
    with pytest.raises(UriPolicyError, match=refused):
        labelled_splits(tiny_cfg(tmp_path, *paths), None, None)
    data = labelled_splits(tiny_cfg(tmp_path, *paths, "data.allowed_schemes=[file, memory]"), None, None)
    assert data.test.column("uri").to_pylist()[-1].endswith("memory:///labelled-test/val/striped/000.png")


def test_test_path_of_another_kind_names_the_field_and_what_was_expected(trees):
    """An image_folder config still pointing data.test_path at the default Fashion-MNIST file."""
    tmp, _, _ = trees
    (tmp / "t10k.gz").write_bytes(b"not a tree")
    cfg = folder_cfg(tmp, test="t10k.gz")
    with pytest.raises(LabelledDataError, match=r"data.test_path .*t10k.gz: .*expects an ImageFolder tree"):
        labelled_splits(cfg, None, None)
