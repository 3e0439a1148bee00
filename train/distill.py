"""Distillation: a trained run (the teacher) gives soft training targets to a smaller model.

The student's training target for each training image is ``(1 - w) * one-hot + w * teacher``,
where ``teacher`` is the teacher's probability vector for that image, softened by a temperature
``T`` (``p ** (1/T)``, renormalised) and ``w`` is the recipe's ``distill``. The teacher is asked
once, on the student's training images at the teacher's own preprocessing (its input size), and
the answers are kept with the run's checkpoints so that ``--resume`` does not ask again.

A teacher must not have learned from what judges the student: every image of the student's
validation and test splits must be outside the teacher's training split (its
``split_manifest.csv``), else validation (early stopping, the threshold) and the test figure
would carry the teacher's memory of them. The teacher's labels must be the student's, and its
recipe the one the student's recipe names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from lungedge.edge_runtime.errors import ConfigError

from .dataset import Dataset, relative_path
from .recipes import Recipe
from .runfolder import MANIFEST, read_manifest

_LOG = logging.getLogger(__name__)

#: the teacher's answers for the student's training images, kept with the checkpoints
TEACHER_PROBS = "teacher_probs.npy"
TEACHER_INFO = "teacher.json"


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``probs ** (1/T)`` renormalised per row: the softmax of the logits divided by ``T``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    z = np.log(p) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def soft_targets(labels: np.ndarray, teacher_probs: np.ndarray, weight: float, temperature: float) -> np.ndarray:
    """The training targets: ``(1 - weight) * one-hot(labels) + weight * soften(teacher_probs, T)``."""
    teacher = soften(teacher_probs, temperature)
    onehot = np.eye(teacher.shape[1])[np.asarray(labels, dtype=np.int64)]
    return ((1.0 - weight) * onehot + weight * teacher).astype(np.float32)


def check_teacher(teacher_dir: Path, recipe: Recipe, ds: Dataset, assignment: np.ndarray):
    """The teacher's (Keras model, spec) after the checks in the module docstring.

    Raises:
        ConfigError: no run folder there, another recipe, other labels, or a teacher that trained
            on an image of the student's validation or test split.
    """
    from .keras_eval import load_run_model

    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / "model.keras").is_file():
        raise ConfigError(f"--teacher {str(teacher_dir)!r} is not a run folder (no model.keras); train one with "
                          f"`lungedge train --recipe {recipe.teacher} --data DIR --out RUN`")
    model, spec, _ = load_run_model(str(teacher_dir))
    if spec is None:
        raise ConfigError(f"teacher {str(teacher_dir)!r} has no spec.json")
    if spec.recipe != recipe.teacher:
        raise ConfigError(f"recipe {recipe.name!r} distils from a run of {recipe.teacher!r}; {str(teacher_dir)!r} "
                          f"was trained by {spec.recipe!r}")
    if list(spec.labels) != list(ds.class_names):
        raise ConfigError(f"teacher {str(teacher_dir)!r} has labels {list(spec.labels)}, the data {list(ds.class_names)}")
    manifest = teacher_dir / MANIFEST
    if not manifest.is_file():
        raise ConfigError(f"teacher {str(teacher_dir)!r} has no {MANIFEST}: which images it trained on is unknown")
    taught = {r["path"] for r in read_manifest(manifest) if r["split"] == "train"}
    judged = [relative_path(ds.paths[i], ds.root) for i in np.flatnonzero(assignment != "train")]
    leaked = [p for p in judged if p in taught]
    if leaked:
        raise ConfigError(f"teacher {str(teacher_dir)!r} trained on {len(leaked)} of the student's {len(judged)} "
                          f"validation and test images (e.g. {leaked[0]!r}): use a teacher trained with the same "
                          f"split (same data, split kind, fractions and seed)")
    return model, spec


def teacher_probabilities(teacher_dir: Path, recipe: Recipe, ds: Dataset, assignment: np.ndarray,
                          train_paths, keep: Path) -> Dict[str, object]:
    """The teacher's probabilities for ``train_paths`` (the student's training images, in the order
    the student trains on them) and a record of the teacher, cached in ``keep``.

    Returns:
        {"probs": array (n, classes), "info": dict for metrics.json}.
    """
    from .input_data import image_dataset

    probs_file, info_file = keep / TEACHER_PROBS, keep / TEACHER_INFO
    if probs_file.is_file() and info_file.is_file():
        probs = np.load(probs_file)
        if len(probs) == len(train_paths):
            return {"probs": probs, "info": json.loads(info_file.read_text())}
    model, spec = check_teacher(teacher_dir, recipe, ds, assignment)
    _LOG.info(f"asking the teacher {teacher_dir} ({spec.recipe}, {spec.preprocessing.height} px) about "
              f"{len(train_paths)} training images")
    data = image_dataset(list(train_paths), None, spec.preprocessing, 32, cache=None)
    probs = np.asarray(model.predict(data, verbose=0), dtype=np.float64)
    info = {"run": str(Path(teacher_dir).resolve()), "recipe": spec.recipe,
            "training_fingerprint": spec.training_fingerprint, "weight": recipe.distill,
            "temperature": recipe.distill_temperature}
    keep.mkdir(parents=True, exist_ok=True)
    np.save(probs_file, probs)
    info_file.write_text(json.dumps(info))
    return {"probs": probs, "info": info}


def teacher_note(info: Optional[dict], train_labels: np.ndarray, probs: Optional[np.ndarray]) -> Optional[dict]:
    """``info`` with how often the teacher's most probable class is the label on the training images."""
    if info is None or probs is None:
        return None
    agree = float(np.mean(np.argmax(probs, axis=1) == np.asarray(train_labels)))
    return {**info, "train_agreement": round(agree, 4)}
