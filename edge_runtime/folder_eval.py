"""Accuracy of a TFLite model on a labelled class-folder dataset, on the device (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .classifier import Classifier, Failure
from .data import list_labelled_folder
from .metrics import classification_metrics


@dataclass(frozen=True)
class LabelledOutputs:
    """A model's outputs on a labelled folder, image by image (readable images only, folder order)."""

    paths: Tuple[str, ...]          # the images that could be read
    y_true: np.ndarray              # (N,) class index of each
    probabilities: np.ndarray       # (N, classes) as the device computes them
    predicted: Tuple[Optional[str], ...]  # every listed image's predicted label, None when unreadable
    failures: Tuple[dict, ...]      # ``Failure.to_dict()`` of each unreadable image


def labelled_outputs(clf: Classifier, data_dir: str, progress: bool = True, limit: Optional[int] = None,
                     workers: Optional[int] = None) -> LabelledOutputs:
    """Classify every image of ``data_dir/<class>/...`` (folder names matched to the model's labels,
    case and spaces ignored); unreadable images are kept as failures and left out of the arrays.

    Raises:
        ConfigError: the folder does not fit the model (see ``list_labelled_folder``).
    """
    files = list_labelled_folder(data_dir, class_names=clf.labels)
    paths, labels = list(files.paths), list(files.labels)
    if limit:
        paths, labels = paths[:limit], labels[:limit]
    kept, y_true, probs, failures, predicted = [], [], [], [], []
    for path, truth, res in zip(paths, labels, clf.classify_many(paths, progress=progress, workers=workers)):
        if isinstance(res, Failure):
            failures.append(res.to_dict())
            predicted.append(None)
            continue
        predicted.append(res.label)
        kept.append(path)
        y_true.append(truth)
        probs.append([res.probabilities[name] for name in clf.labels])
    return LabelledOutputs(tuple(kept), np.asarray(y_true, dtype=np.int64),
                           np.asarray(probs, dtype=np.float64).reshape(len(kept), len(clf.labels)),
                           tuple(predicted), tuple(failures))


def evaluate_classifier(clf: Classifier, data_dir: str, progress: bool = True, limit: Optional[int] = None,
                        workers: Optional[int] = None, keep_predictions: bool = False) -> dict:
    """Classify every image of ``data_dir/<class>/...`` and compute metrics.

    Folder names are matched to the model's labels (case and spaces ignored). Unreadable
    images are listed under ``failures`` and left out of the metrics.

    Returns:
        ``classification_metrics`` output plus ``failures``, ``model`` (``clf.describe()``)
        and ``decision`` ("threshold" or "argmax"). ``workers`` as in ``Classifier.classify_many``.
        With ``keep_predictions``, also ``predictions``: each image's predicted label (None if it
        could not be read), in folder order.
    """
    out = labelled_outputs(clf, data_dir, progress=progress, limit=limit, workers=workers)
    index = {name: i for i, name in enumerate(clf.labels)}
    y_pred = [index[label] for label in out.predicted if label is not None]
    if len(out.y_true):
        metrics = classification_metrics(out.y_true.tolist(), y_pred, clf.labels, out.probabilities)
    else:
        metrics = classification_metrics([], [], clf.labels)
    metrics["failures"] = list(out.failures)
    if keep_predictions:
        metrics["predictions"] = list(out.predicted)
    metrics["model"] = clf.describe()
    metrics["data"] = str(data_dir)
    metrics["decision"] = "threshold" if clf.use_threshold else "argmax"
    return metrics
