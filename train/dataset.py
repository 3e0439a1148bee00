"""Datasets for training: folder layouts, patient ids, splits, the split manifest, unreadable files.

No TensorFlow here (see ``train.input_data`` for tf.data); scikit-learn is imported inside the
split functions.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from lungedge.edge_runtime.image_files import list_labelled_folder, patient_id  # noqa: F401 - patient_id re-exported
from lungedge.edge_runtime.errors import ConfigError, InputError
from lungedge.edge_runtime.spec import Preprocessing

from .recipes import SPLITS


@dataclass
class Dataset:
    """Labelled image files plus optional patient groups and a fixed test set (Kaggle layout)."""

    paths: List[str]
    labels: np.ndarray
    class_names: Tuple[str, ...]
    root: str
    fixed_split: Optional[List[str]] = None  # per-file "test" for files from a Kaggle test/ folder, else None
    failures: List[Dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def groups(self, required: bool = False) -> Optional[List[Optional[str]]]:
        """Patient id per file (None where the name has none).

        Raises:
            ConfigError: ``required`` and some file names carry no patient id.
        """
        ids = [patient_id(p) for p in self.paths]
        if required:
            missing = [p for p, g in zip(self.paths, ids) if g is None]
            if missing:
                raise ConfigError(
                    f"patient-grouped split needs patient ids in file names (Kermany person123_..., IM-0123-...); "
                    f"{len(missing)} of {len(ids)} files have none, e.g. {Path(missing[0]).name!r}; use split 'random'")
        return ids

    def slice_blocks(self, size: int) -> List[str]:
        """Per file, its class and block of ``size`` consecutive slice numbers (``Bengin case
        (17).jpg`` with size 16: ``Bengin cases/1``): a stand-in for patients where file names carry
        none but number the slices in order, as in IQ-OTH/NCCD (the nearest neighbour of a slice is
        the next or previous number: train/SELECTION.md).

        Raises:
            ConfigError: some file names carry no number.
        """
        out = []
        for path, label in zip(self.paths, self.labels):
            number = slice_number(path)
            if number is None:
                raise ConfigError(f"split 'blocked' needs numbered file names (IQ-OTH/NCCD 'Bengin case (17).jpg'); "
                                  f"{Path(path).name!r} has no number; use split 'random'")
            out.append(f"{self.class_names[label]}/{number // size}")
        return out

    def split_groups(self, kind: str, block: int) -> Optional[np.ndarray]:
        """The groups that a split of ``kind`` keeps together: patients ("grouped"), blocks of
        ``block`` consecutive slice numbers ("blocked"), none ("random").

        Raises:
            ConfigError: an unknown kind, or file names without the patient ids or numbers it needs.
        """
        if kind == "random":
            return None
        if kind == "grouped":
            return np.asarray(self.groups(required=True), dtype=object)
        if kind == "blocked":
            return np.asarray(self.slice_blocks(block), dtype=object)
        names = ", ".join(repr(s) for s in SPLITS[:-1]) + f" or {SPLITS[-1]!r}"
        raise ConfigError(f"split must be {names}, got {kind!r}")

    def counts(self) -> Dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}

    def subset(self, keep: np.ndarray) -> "Dataset":
        idx = np.flatnonzero(keep)
        return Dataset(
            [self.paths[i] for i in idx], self.labels[idx], self.class_names, self.root,
            None if self.fixed_split is None else [self.fixed_split[i] for i in idx], list(self.failures))


_SLICE_NUMBER = re.compile(r"(\d+)\D*$")


def slice_number(path: str) -> Optional[int]:
    """The number of a file: the last run of digits in its stem (``Malignant case (101).jpg`` -> 101), or None."""
    m = _SLICE_NUMBER.search(Path(path).stem)
    return int(m.group(1)) if m else None


def load_dataset(data_dir: str) -> Dataset:
    """List a labelled dataset. Two layouts:

    * a class-folder tree ``DIR/<class>/**/<image>`` (IQ-OTH/NCCD keeps its upstream names with
      spaces, e.g. ``Bengin cases``); class names are the folder names, sorted;
    * the Kaggle chest X-ray layout ``DIR/train/<class>``, optional ``DIR/val/<class>`` and
      ``DIR/test/<class>``: train and val are pooled (the official val has only 16 images, so
      validation is carved from the pool) and ``test/`` is kept as the test split.

    Raises:
        InputError: missing folder, no classes or no images. ConfigError: split folders whose classes differ.
    """
    root = Path(data_dir)
    if root.is_file():
        raise InputError(f"expected a data folder DIR/<class>/<image>, got a file: {str(data_dir)!r}")
    if not root.is_dir():
        raise InputError(f"data folder not found: {str(data_dir)!r}")
    if (root / "train").is_dir() and _has_class_folders(root / "train"):
        train = list_labelled_folder(str(root / "train"))
        paths, labels, fixed = list(train.paths), list(train.labels), [""] * len(train)
        for part in ("val", "test"):
            if (root / part).is_dir():
                more = list_labelled_folder(str(root / part), class_names=train.class_names)
                paths += list(more.paths)
                labels += list(more.labels)
                fixed += ["test" if part == "test" else ""] * len(more)
        has_test = any(fixed)
        return Dataset(paths, np.asarray(labels, dtype=np.int64), train.class_names, str(root),
                       [f or None for f in fixed] if has_test else None)
    files = list_labelled_folder(str(root))
    if len(files.class_names) < 2:
        raise InputError(f"need at least 2 class folders in {str(root)!r}, found {list(files.class_names)!r}")
    return Dataset(list(files.paths), np.asarray(files.labels, dtype=np.int64), files.class_names, str(root))


def _has_class_folders(p: Path) -> bool:
    return any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir())


def find_unreadable(paths: Sequence[str], prep: Preprocessing, workers: int = 0) -> List[Dict[str, str]]:
    """``[{"path": ..., "error": ...}]`` for each file the shared preprocessing cannot read, in input order
    (a progress bar when ``edge_runtime.progress`` shows them)."""
    from lungedge.edge_runtime.progress import shown
    from lungedge.edge_runtime.readability import unreadable

    return [{"path": p, "error": e} for p, e in unreadable(paths, prep, workers, shown())]


def drop_unreadable(ds: Dataset, prep: Preprocessing) -> Dataset:
    """Check every file; return the dataset without unreadable ones, listed in ``failures``."""
    failures = find_unreadable(ds.paths, prep)
    if not failures:
        return ds
    bad = {f["path"] for f in failures}
    out = ds.subset(np.asarray([p not in bad for p in ds.paths]))
    out.failures = failures
    return out


def split_dataset(ds: Dataset, fractions: Sequence[float], kind: str = "random", seed: int = 0,
                  block: int = 16) -> np.ndarray:
    """Assign each file to "train", "val" or "test".

    ``random``: stratified per class (scikit-learn ``train_test_split``), fractions as given.
    ``grouped``: stratified and patient-grouped (``StratifiedGroupKFold``), so no patient is on
    two sides; the fractions are met approximately (whole patients move).
    ``blocked``: the same with blocks of ``block`` consecutive slice numbers per class as the
    groups (``Dataset.slice_blocks``), for numbered slices without patient ids.
    With a fixed test set (Kaggle ``test/``) only train/val are split, in the ratio of their fractions.

    Returns:
        An array of split names, one per file.

    Raises:
        ConfigError: too few images per class for the split, or grouped without patient ids
            (blocked without numbers).
    """
    groups = ds.split_groups(kind, block)
    n = len(ds)
    out = np.empty(n, dtype=object)
    train_f, val_f, test_f = (float(x) for x in fractions)
    if ds.fixed_split is not None:
        fixed_test = np.asarray([s == "test" for s in ds.fixed_split])
        out[fixed_test] = "test"
        pool = np.flatnonzero(~fixed_test)
        test_f = 0.0
    else:
        pool = np.arange(n)
    counts = np.bincount(ds.labels[pool], minlength=len(ds.class_names))
    if counts.min() < 3:
        raise ConfigError(f"each class needs at least 3 images to split into train/val/test, got {dict(zip(ds.class_names, counts.tolist()))}")
    rest = pool
    if test_f > 0:
        rest, test = _split_off(rest, ds.labels, groups, test_f, seed)
        out[test] = "test"
    train, val = _split_off(rest, ds.labels, groups, val_f / (train_f + val_f), seed + 1)
    out[train] = "train"
    out[val] = "val"
    _check_every_class(ds, out, groups, kind)
    return out


def _check_every_class(ds: Dataset, assignment: np.ndarray, groups: Optional[np.ndarray], kind: str,
                       where: str = "") -> None:
    """Every split of ``assignment`` holds every class: with whole patients or blocks moving, a class
    with too few of them can miss a split, and its recall there would be a silent 0.

    Raises:
        ConfigError: naming the split, the class and how many groups it has.
    """
    for part in ("train", "val", "test"):
        in_part = assignment == part
        if not in_part.any():
            continue
        for c, name in enumerate(ds.class_names):
            if not (in_part & (ds.labels == c)).any():
                n = len(set(groups[ds.labels == c])) if groups is not None else int((ds.labels == c).sum())
                unit = {"grouped": "patients", "blocked": "blocks"}.get(kind, "images")
                hint = (" use fewer folds or a smaller --set split_block" if kind == "blocked" else
                        " use fewer folds" if kind == "grouped" else "")
                raise ConfigError(f"{where}the {part} part has no {name!r} image: the class has only {n} {unit} to "
                                  f"share out;{hint or ' add images'}")


def _split_off(idx: np.ndarray, labels: np.ndarray, groups: Optional[np.ndarray], frac: float, seed: int):
    """Split ``idx`` into (rest, part) with ``part`` about ``frac`` of it, stratified by label."""
    y = labels[idx]
    if groups is None:
        from sklearn.model_selection import train_test_split

        rest, part = train_test_split(idx, test_size=frac, stratify=y, random_state=seed, shuffle=True)
        return np.sort(rest), np.sort(part)
    from sklearn.model_selection import StratifiedGroupKFold

    k = max(2, int(round(1.0 / frac)))
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    rest_i, part_i = next(iter(sgkf.split(np.zeros(len(idx)), y, groups[idx])))
    return np.sort(idx[rest_i]), np.sort(idx[part_i])


def kfold_assignments(ds: Dataset, k: int, val_fraction: float, kind: str = "random", seed: int = 0,
                      block: int = 16) -> List[np.ndarray]:
    """Stratified k-fold (grouped by patient when ``kind`` is "grouped", by blocks of ``block``
    consecutive slice numbers when "blocked"; see ``split_dataset``): for each fold, an
    array of split names where the fold is "test" and a stratified ``val_fraction`` of the rest
    is "val" (for early stopping and the threshold).

    Raises:
        ConfigError: k out of range for the smallest class.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    counts = np.bincount(ds.labels, minlength=len(ds.class_names))
    if not 2 <= k <= counts.min():
        raise ConfigError(f"--cv must be from 2 to the smallest class size ({counts.min()}), got {k}")
    groups = ds.split_groups(kind, block)
    x = np.zeros(len(ds))
    if groups is None:
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, ds.labels)
    else:
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(x, ds.labels, groups)
    out = []
    for i, (rest, test) in enumerate(folds):
        a = np.empty(len(ds), dtype=object)
        a[test] = "test"
        train, val = _split_off(np.asarray(rest), ds.labels, groups, val_fraction, seed + 100 + i)
        a[train] = "train"
        a[val] = "val"
        _check_every_class(ds, a, groups, kind, where=f"fold {i + 1} of {k}: ")
        out.append(a)
    return out


def write_manifest(path: Path, ds: Dataset, assignment: np.ndarray) -> None:
    """The run folder's split manifest (``train.runfolder.MANIFEST``) for ``ds`` split by ``assignment``."""
    from .runfolder import write_manifest as write_rows

    write_rows(path, [(relative_path(p, ds.root), ds.class_names[int(y)], s, g or "")
                      for p, y, s, g in zip(ds.paths, ds.labels, assignment, ds.groups())])


def read_manifest(path: Path, ds: Dataset) -> np.ndarray:
    """The split of each file of ``ds`` from a saved manifest (for --resume).

    Raises:
        ConfigError: the manifest is damaged or does not list the same files as the data folder.
    """
    from .runfolder import read_manifest as read_rows

    rows = {r["path"]: r["split"] for r in read_rows(path)}
    keys = [relative_path(p, ds.root) for p in ds.paths]
    missing = [k for k in keys if k not in rows]
    if missing or len(rows) != len(keys):
        raise ConfigError(f"split manifest {str(path)!r} does not match the data folder ({len(rows)} listed, "
                          f"{len(keys)} found, e.g. {missing[:1]}); resume needs the same data")
    return np.asarray([rows[k] for k in keys], dtype=object)


def fingerprint(ds: Dataset, assignment: np.ndarray) -> str:
    """sha256 over the training and validation files (relative path, label, size): identifies the training data."""
    h = hashlib.sha256()
    for p, y, s in sorted(zip(ds.paths, ds.labels, assignment), key=lambda t: relative_path(t[0], ds.root)):
        if s in ("train", "val"):
            size = os.path.getsize(p)
            h.update(f"{relative_path(p, ds.root)}\t{ds.class_names[int(y)]}\t{s}\t{size}\n".encode())
    return "sha256:" + h.hexdigest()


def class_weights(labels: np.ndarray, num_classes: int) -> Dict[int, float]:
    """Balanced class weights (scikit-learn's ``compute_class_weight('balanced')``)."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    w = compute_class_weight("balanced", classes=present, y=labels)
    out = {i: 1.0 for i in range(num_classes)}
    out.update({int(c): float(v) for c, v in zip(present, w)})
    return out


def relative_path(path: str, root: str) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)
