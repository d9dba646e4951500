"""Labelled train/test splits for evaluation, from any data source the pipeline reads (docs/pipeline.md#evaluate).

The train split is ``data.path`` and the test split ``data.test_path``, both read as ``data.source`` by the
pipeline's own manifest builder (:func:`pipeline.orchestrate.build_manifest`):

* ``idx``: IDX images files (e.g. Fashion-MNIST ``train-images-idx3-ubyte.gz`` / ``t10k-images-idx3-ubyte.gz``), the
  labels from each one's MNIST-named sibling (``*-labels-idx1-*``).
* ``image_folder``: ImageFolder trees (``train/<class>/<image>``, ``val/<class>/<image>``). Class indices are the
  positions of the **train** tree's sorted class directory names, in both splits; a val class the train tree lacks
  is an error naming it.
* ``uri_list``: Parquet/CSV lists with ``uri`` and an integer ``label`` column.

Paths are local or any fsspec URL (IDX files local only, as for the pipeline's manifest); every URI of both splits
is checked against the input policy (:class:`stages.uri_policy.UriPolicy` of the ``data`` section) before anything
is read. Subsets: IDX splits keep their first ``n`` records (the Fashion-MNIST convention); the other sources are
usually sorted by class, so ``n`` rows are drawn without replacement with a fixed seed and kept in manifest order.

Errors are :class:`LabelledDataError` (a ``ValueError``) subclasses naming the file or field and what was expected:
:class:`NoTestSplitError`, :class:`UnlabelledError`, :class:`ClassMismatchError`.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
import numpy as np
import pyarrow as pa

from infra import storage
from pipeline import config as C
from pipeline.orchestrate import build_manifest
from stages.uri_policy import DEFAULT_POLICY, UriPolicy, UriPolicyError

log = logging.getLogger(__name__)

EXPECTED = {
    "idx": "an IDX images file with its MNIST-named labels file beside it (e.g. t10k-images-idx3-ubyte.gz and "
           "t10k-labels-idx1-ubyte.gz)",
    "image_folder": "an ImageFolder tree root/<class>/<image> with the train tree's class names (e.g. ImageNet's val)",
    "uri_list": "a Parquet or CSV list with a 'uri' and an integer 'label' column",
}


class LabelledDataError(ValueError):
    """Labelled splits that cannot be evaluated: a missing, unreadable or mismatched file; names it."""


class NoTestSplitError(LabelledDataError):
    """``data.test_path`` is not set."""


class UnlabelledError(LabelledDataError):
    """A split without labels (or with some rows unlabelled)."""


class ClassMismatchError(LabelledDataError):
    """Test labels outside the train split's classes, a val class the train tree lacks, or a ``num_classes`` that
    disagrees with the data."""


@dataclass(frozen=True)
class LabelledData:
    """Both splits as manifests (:data:`stages.manifest.MANIFEST_SCHEMA`: ``index``, ``uri``, ``label``, ...).

    Attributes:
        train: the train split, every ``label`` in [0, num_classes).
        test: the test split, labels in the train split's class indices.
        num_classes: C.
        source_desc: one line saying where the splits came from (for logs and results).
    """

    train: pa.Table
    test: pa.Table
    num_classes: int
    source_desc: str


def labels_of(table: pa.Table) -> np.ndarray:
    """The ``label`` column of a labelled manifest as int64 (N,)."""
    return table.column("label").to_numpy().astype(np.int64)


def labelled_splits(cfg: C.PipelineConfig, n_train: int | None, n_test: int | None,
                    num_classes: int | None = None, seed: int = 0) -> LabelledData:
    """The config's labelled train (``data.path``) and test (``data.test_path``) splits (module docstring).

    Args:
        cfg: the pipeline config; its ``data`` section names the source, the two paths and the input policy.
        n_train / n_test: rows of each split (None: all).
        num_classes: the expected class count (None: the train split's: its class directories, else max label + 1).
        seed: draws the subsets of non-IDX sources.

    Raises:
        NoTestSplitError: ``data.test_path`` is null.
        UnlabelledError: a split without labels (names the file and how to add them).
        ClassMismatchError: test labels outside the train classes, a val class missing from the train tree, or a
            ``num_classes`` that disagrees.
        LabelledDataError: a path that is not the expected kind of file or tree.
        UriPolicyError: a URI the input policy refuses.
    """
    d = cfg.data
    if not d.test_path:
        raise NoTestSplitError(f"data.test_path is not set: evaluate needs a labelled test split of the same source as "
                               f"data.path (data.source {d.source}: {EXPECTED[d.source]})")
    return splits(d.source, d.path, d.test_path, UriPolicy.of(d), n_train, n_test, num_classes, seed)


def splits(source: str, path: str, test_path: str, policy: UriPolicy = DEFAULT_POLICY, n_train: int | None = None,
           n_test: int | None = None, num_classes: int | None = None, seed: int = 0) -> LabelledData:
    """Labelled splits of ``path`` (train) and ``test_path`` (test) read as ``source``; see :func:`labelled_splits`
    (error messages name the files as ``data.path`` / ``data.test_path``)."""
    train = _split(source, path, "data.path", policy)
    test = _split(source, test_path, "data.test_path", policy)
    if source == "image_folder":
        classes = _class_dirs(path)
        test = _map_classes(test, test_path, _class_dirs(test_path), classes, path)
        count = len(classes)
        if num_classes is not None and num_classes != count:
            raise ClassMismatchError(f"--num-classes {num_classes} disagrees with data.path {path}: its tree has "
                                     f"{count} class directories")
    else:
        count = int(labels_of(train).max()) + 1
        if num_classes is not None and num_classes < count:
            raise ClassMismatchError(f"--num-classes {num_classes} disagrees with data.path {path}: its labels "
                                     f"go up to {count - 1}, so it has at least {count} classes")
        count = num_classes or count
    outside = sorted(set(labels_of(test).tolist()) - set(range(count)))
    if outside:
        raise ClassMismatchError(f"data.test_path {test_path}: labels {outside[:10]} are outside the {count} "
                                 f"classes of data.path {path} (expected labels 0..{count - 1})")
    sub_train, sub_test = _subset(train, n_train, source, seed), _subset(test, n_test, source, seed + 1)
    desc = (f"{source}: {path} ({sub_train.num_rows}/{train.num_rows} train) and {test_path} "
            f"({sub_test.num_rows}/{test.num_rows} test), {count} classes")
    log.info("evaluation data %s", desc)
    return LabelledData(sub_train, sub_test, count, desc)


def _split(source: str, path: str, field: str, policy: UriPolicy) -> pa.Table:
    """The whole manifest of one split, labelled and within the policy."""
    if source == "idx" and not storage.is_local(path):
        raise LabelledDataError(f"{field} {path}: data.source idx reads local IDX files (its manifest URIs are "
                                f"idx://<local path>#<record>): copy the files to a local disk, or list the images "
                                f"in a uri_list")
    try:
        table = build_manifest(source, path, policy)
    except UriPolicyError:
        raise
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        raise LabelledDataError(f"{field} {path}: {err} (data.source {source} expects {EXPECTED[source]})") from err
    if table.num_rows == 0:
        raise LabelledDataError(f"{field} {path}: no images (data.source {source} expects {EXPECTED[source]})")
    labels = table.column("label")
    if labels.null_count:
        what = "has no labels" if labels.null_count == table.num_rows else (
            f"has {labels.null_count} of {table.num_rows} rows without a label")
        raise UnlabelledError(f"{field} {path} {what}: evaluation needs labelled images; {_how_to_label(source, path)}")
    if int(np.min(labels_of(table))) < 0:
        raise ClassMismatchError(f"{field} {path}: negative labels (expected class indices 0..C-1)")
    for uri in table.column("uri").to_pylist():
        policy.check(uri)
    return table


def _how_to_label(source: str, path: str) -> str:
    """How to give a split of ``source`` its labels."""
    if source == "idx":
        name = PurePosixPath(str(path)).name
        pair = name.replace("images-idx3", "labels-idx1")
        return (f"put its labels IDX file beside it as {pair}" if pair != name else
                "name it *-images-idx3-* and put its labels beside it as the matching *-labels-idx1-* file")
    return "add an integer 'label' column (class index 0..C-1) to the list"


def _class_dirs(root: str) -> list[str]:
    """Sorted class directory names of an ImageFolder tree (the order its manifest's labels index)."""
    fs, path = fsspec.core.url_to_fs(root)
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
                  if e["type"] == "directory")


def _map_classes(test: pa.Table, test_root: str, test_classes: list[str], train_classes: list[str],
                 train_root: str) -> pa.Table:
    """Relabel a val tree's manifest with the train tree's class indices (by class directory name)."""
    missing = [c for c in test_classes if c not in train_classes]
    if missing:
        raise ClassMismatchError(f"data.test_path {test_root}: class directories {missing[:10]} are not classes of "
                                 f"data.path {train_root} (its {len(train_classes)} classes: "
                                 f"{', '.join(train_classes[:10])}{', ...' if len(train_classes) > 10 else ''})")
    to_train = np.array([train_classes.index(c) for c in test_classes], dtype=np.int64)
    index = test.schema.get_field_index("label")
    return test.set_column(index, test.schema.field(index), pa.array(to_train[labels_of(test)], type=pa.int64()))


def _subset(table: pa.Table, n: int | None, source: str, seed: int) -> pa.Table:
    """``n`` rows of a split (module docstring), ``index`` renumbered 0..n-1."""
    if n is None or n >= table.num_rows:
        return table
    if n < 1:
        raise LabelledDataError(f"the number of images per split must be at least 1, got {n}")
    if source == "idx":
        table = table.slice(0, n)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False))
        table = table.take(pa.array(rows))
    return table.set_column(0, table.schema.field(0), pa.array(np.arange(n, dtype=np.int64)))
