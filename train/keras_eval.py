"""Evaluate a Keras model (a run folder or a .keras file) on a labelled class-folder dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from lungedge.edge_runtime.image_files import list_labelled_folder
from lungedge.edge_runtime.errors import ModelError
from lungedge.edge_runtime.metrics import classification_metrics
from lungedge.edge_runtime.spec import ModelSpec, Preprocessing

from .dataset import find_unreadable
from lungedge.edge_runtime.decision import apply_threshold


def load_run_model(model_or_run_dir: str):
    """(keras model, ModelSpec, model path). A run folder gives ``model.keras`` + ``spec.json``; a
    ``.keras`` file uses a ``spec.json`` beside it, or else its input shape, MobileNetV2
    normalisation and the data's sorted folder names (``spec`` is then None).

    Raises:
        ModelError: no model, or a file Keras cannot load.
    """
    from .tfimport import load_keras_model

    p = Path(model_or_run_dir)
    model_path = p / "model.keras" if p.is_dir() else p
    if not model_path.is_file():
        raise ModelError(f"no Keras model at {str(model_path)!r} (expected a run folder with model.keras, or a .keras file)")
    spec_path = model_path.parent / "spec.json"
    spec = ModelSpec.from_json(spec_path.read_text()) if spec_path.is_file() else None
    return load_keras_model(model_path), spec, model_path


def evaluate_keras(model_or_run_dir: str, data_dir: str, limit: Optional[int] = None, use_threshold: bool = True,
                   batch_size: int = 32) -> dict:
    """Classify every image of ``data_dir/<class>/...`` with the Keras model and compute metrics.

    Folder names are matched to the model's labels (case and spaces ignored). Unreadable images
    are listed under ``failures`` and left out of the metrics. The threshold stored in the spec
    is applied when ``use_threshold`` (the runtime's rule).

    Returns:
        ``classification_metrics`` output plus ``failures``, ``model``, ``decision`` and ``data``.

    Raises:
        ModelError: the model cannot be loaded. ConfigError: the data folder does not fit the model.
    """
    from .input_data import image_dataset
    from .tfimport import import_tf

    _, keras = import_tf()
    model, spec, model_path = load_run_model(model_or_run_dir)
    if spec is None:
        _, h, w, c = model.input_shape
        files0 = list_labelled_folder(data_dir)
        spec = ModelSpec(labels=files0.class_names,
                         preprocessing=Preprocessing(height=int(h), width=int(w), color_mode="rgb" if c == 3 else "grayscale"))
    n_out = int(model.output_shape[-1])
    if n_out != spec.num_classes:
        raise ModelError(f"model {str(model_path)!r} has {n_out} outputs but its spec lists {spec.num_classes} labels")
    files = list_labelled_folder(data_dir, class_names=spec.labels)
    paths, labels = list(files.paths), np.asarray(files.labels, dtype=np.int64)
    if limit:
        paths, labels = paths[:limit], labels[:limit]
    failures = find_unreadable(paths, spec.preprocessing)
    bad = {f["path"] for f in failures}
    keep = np.asarray([p not in bad for p in paths], dtype=bool)
    paths = [p for p, k in zip(paths, keep) if k]
    labels = labels[keep] if len(keep) else labels
    th = spec.threshold if use_threshold else None
    names = list(spec.labels)
    if paths:
        ds = image_dataset(paths, None, spec.preprocessing, batch_size, cache=None)
        # verbose 0: Keras draws its bar on stdout, where the results go
        probs = np.asarray(model.predict(ds, verbose=0), dtype=np.float64)
        pos = names.index(th.label) if th else None
        pred = apply_threshold(probs, pos, th.value if th else None)
        metrics = classification_metrics(labels, pred, names, probs)
    else:
        metrics = classification_metrics([], [], names)
    metrics["failures"] = failures
    metrics["model"] = {"model": str(model_path), "backend": "keras", "backend_version": keras.__version__,
                        "labels": names, "threshold": th.to_dict() if th else None, "recipe": spec.recipe,
                        "variant": "keras"}
    metrics["decision"] = "threshold" if th else "argmax"
    metrics["data"] = str(data_dir)
    return metrics
