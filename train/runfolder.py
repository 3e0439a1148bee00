"""The run-folder contract, in one place: its file names, the split manifest (written and read,
validated on read), and reading a finished run (``load_run``). No TensorFlow.

A training run folder holds ``MODEL`` (the Keras model), ``SPEC`` (labels, preprocessing,
threshold), ``RECIPE`` (the resolved recipe), ``MANIFEST`` (which file went to which split),
``HISTORY`` (per epoch), ``METRICS`` (test metrics and the learning-floor verdict), ``CARD``
(the model card) and ``PLOTS``/; ``CHECKPOINTS``/ exists only while a run is unfinished.
Conversion adds ``model_<variant>.tflite`` and ``quantization_report.{json,md,png}``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from lungedge.edge_runtime.image_files import list_labelled_folder
from lungedge.edge_runtime.atomic_write import atomic_write_text
from lungedge.edge_runtime.errors import ConfigError, InputError, ModelError
from lungedge.edge_runtime.spec import ModelSpec


MODEL = "model.keras"
SPEC = "spec.json"
RECIPE = "recipe.json"
MANIFEST = "split_manifest.csv"
HISTORY = "history.csv"
METRICS = "metrics.json"
CARD = "model_card.md"
PLOTS = "plots"
CHECKPOINTS = "checkpoints"
#: decoded images beyond the memory budget (tf.data file cache), removed when training ends
IMAGE_CACHE = ".image-cache"
#: Every file a finished run has.
CONTRACT = (MODEL, SPEC, RECIPE, MANIFEST, HISTORY, METRICS, CARD)
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "split", "group")


def tflite_name(variant: str) -> str:
    """The file name of a converted variant inside the run folder."""
    return f"model_{variant}.tflite"


def write_manifest(path: Path, rows: Sequence[Tuple[str, str, str, str]]) -> None:
    """Write ``MANIFEST`` rows ``(path, label, split, group)``; paths relative to the data root."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    w.writerows(rows)
    atomic_write_text(str(path), buf.getvalue())


def read_manifest(path: Path) -> List[dict]:
    """The rows of a ``MANIFEST``, validated: the columns are there, every split is one of ``SPLITS``
    and every path and label is non-empty.

    Raises:
        InputError: unreadable or damaged, naming the file and the line.
    """
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "label", "split"} - set(reader.fieldnames or [])
            if missing:
                raise InputError(f"{path} lacks column(s) {sorted(missing)}; has {reader.fieldnames}")
            rows = []
            for line, row in enumerate(reader, start=2):
                if row.get("split") not in SPLITS or not row.get("path") or not row.get("label"):
                    raise InputError(f"{path} line {line} is damaged: {dict(row)!r} (expected a path, a label and "
                                      f"a split of {', '.join(SPLITS)})")
                rows.append(dict(row))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the split manifest {str(path)!r}: {exc}") from None


@dataclass(frozen=True)
class Split:
    """Labelled image files of one split; ``labels`` index into the model's labels."""

    paths: Tuple[str, ...]
    labels: Tuple[int, ...]
    source: str

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class RunFolder:
    path: Path
    model_path: Path
    spec: ModelSpec
    manifest: Tuple[dict, ...]
    data_root: Optional[Path] = None

    def split(self, name: str) -> Split:
        """Rows of the manifest whose split is ``name`` (possibly empty)."""
        index = {label: i for i, label in enumerate(self.spec.labels)}
        paths, labels = [], []
        for row in self.manifest:
            if row["split"] != name:
                continue
            if row["label"] not in index:
                raise ConfigError(f"the split manifest has label {row['label']!r}, not one of the model's "
                                  f"labels {list(self.spec.labels)}")
            paths.append(self._resolve(row["path"]))
            labels.append(index[row["label"]])
        return Split(tuple(paths), tuple(labels), f"{name} split of {self.path / MANIFEST}")

    def _resolve(self, p: str) -> str:
        path = Path(p)
        if path.is_absolute():
            return str(path)
        # train/ writes paths relative to the data root it recorded in metrics.json
        for base in ([self.data_root] if self.data_root else []) + [self.path]:
            if (base / path).exists():
                return str(base / path)
        return str(path)


def load_run(run_dir) -> RunFolder:
    """Read a run folder.

    Raises:
        InputError: the folder, its spec.json or split_manifest.csv is missing or invalid.
        ModelError: no model.keras in it.
    """
    root = Path(run_dir)
    if not root.exists():
        raise InputError(f"run folder not found: {str(root)!r}")
    if not root.is_dir():
        raise InputError(f"expected a training run folder, got a file: {str(root)!r}")
    model_path = root / MODEL
    if not model_path.is_file():
        raise ModelError(f"no {MODEL} in run folder {str(root)!r} (is it a training run?)")
    spec_path = root / SPEC
    if not spec_path.is_file():
        raise InputError(f"no {SPEC} in run folder {str(root)!r}")
    try:
        spec = ModelSpec.from_json(spec_path.read_text(encoding="utf-8"))
    except ConfigError as exc:
        raise InputError(f"{spec_path}: {exc}") from None
    manifest = root / MANIFEST
    return RunFolder(root, model_path, spec, tuple(read_manifest(manifest) if manifest.is_file() else ()),
                     _data_root(root))


def _data_root(root: Path) -> Optional[Path]:
    """The data folder the run was trained on (``metrics.json`` key ``data``), if recorded."""
    import json

    try:
        data = json.loads((root / METRICS).read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(data) if isinstance(data, str) and data else None


def eval_split(run: RunFolder, data_dir: Optional[str] = None) -> Tuple[Split, str]:
    """The images to judge the variants on, and a note saying where they came from.

    ``data_dir`` (a class-folder tree) wins; otherwise the manifest's test split, or its
    validation split when there is no test split (the note says so).

    Raises:
        ConfigError: no usable images.
    """
    if data_dir is not None:
        files = list_labelled_folder(str(data_dir), class_names=run.spec.labels)
        return Split(files.paths, files.labels, f"--data {data_dir}"), f"labelled folder {data_dir}"
    test = run.split("test")
    if len(test):
        return test, "test split of the run's split_manifest.csv (in-folder: the training images' folder, not another site)"
    val = run.split("val")
    if len(val):
        return val, "NO test split in the run's manifest: validation split used instead (optimistic)"
    raise ConfigError(f"no test or val rows in {run.path / MANIFEST}; pass --data DIR")


def calibration_split(run: RunFolder) -> Split:
    """The manifest's training split (calibration must come from training images).

    Raises:
        ConfigError: the manifest has no training rows.
    """
    train = run.split("train")
    if not len(train):
        raise ConfigError(f"no train rows in {run.path / MANIFEST} to calibrate the integer "
                          "variants from; pass a calibration folder")
    return train


def class_counts(labels: Sequence[int], names: Sequence[str]) -> dict:
    return {n: int(sum(1 for y in labels if y == i)) for i, n in enumerate(names)}
