"""Accuracy of a TFLite model on a labelled class-folder dataset, on the device (numpy only)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .classifier import Classifier, Failure
from .data import list_labelled_folder
from .metrics import classification_metrics


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
    files = list_labelled_folder(data_dir, class_names=clf.labels)
    paths, labels = list(files.paths), list(files.labels)
    if limit:
        paths, labels = paths[:limit], labels[:limit]
    y_true, y_pred, probs, failures = [], [], [], []
    results = clf.classify_many(paths, progress=progress, workers=workers)
    index = {name: i for i, name in enumerate(clf.labels)}
    predicted = []
    for truth, res in zip(labels, results):
        if isinstance(res, Failure):
            failures.append(res.to_dict())
            predicted.append(None)
            continue
        predicted.append(res.label)
        y_true.append(truth)
        y_pred.append(index[res.label])
        probs.append([res.probabilities[name] for name in clf.labels])
    if y_true:
        metrics = classification_metrics(y_true, y_pred, clf.labels, np.asarray(probs))
    else:
        metrics = classification_metrics([], [], clf.labels)
    metrics["failures"] = failures
    if keep_predictions:
        metrics["predictions"] = predicted
    metrics["model"] = clf.describe()
    metrics["data"] = str(data_dir)
    metrics["decision"] = "threshold" if clf.use_threshold else "argmax"
    return metrics
