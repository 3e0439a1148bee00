"""Accuracy of a TFLite model on a labelled class-folder dataset, on the device (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .classifier import Classifier, Failure, Refusal
from .image_files import list_labelled_folder
from .metrics import classification_metrics


@dataclass(frozen=True)
class LabelledOutputs:
    """A model's outputs on a labelled folder, image by image (readable images only, folder order)."""

    paths: Tuple[str, ...]          # the images that could be read
    y_true: np.ndarray              # (N,) class index of each
    probabilities: np.ndarray       # (N, classes) as the device computes them
    predicted: Tuple[Optional[str], ...]  # every listed image's predicted label, None when unreadable
    failures: Tuple[dict, ...]      # ``Failure.to_dict()`` of each unreadable image
    #: ``Refusal.to_dict()`` of each image the domain gate refused (not in the arrays above)
    refused: Tuple[dict, ...] = ()
    #: every usable image, refused ones included with what the model would have said
    all_y: Optional[np.ndarray] = None
    all_probabilities: Optional[np.ndarray] = None
    #: the domain score of each image in ``paths`` (None for a file without one)
    scores: Optional[np.ndarray] = None


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
    kept, y_true, probs, failures, predicted, refused, all_y, all_p, scores = [], [], [], [], [], [], [], [], []
    for path, truth, res in zip(paths, labels, clf.classify_many(paths, progress=progress, workers=workers)):
        if isinstance(res, Refusal):
            refused.append(res.to_dict())
            predicted.append(None)
            if res.hidden is not None:
                all_y.append(truth)
                all_p.append([res.hidden.probabilities[name] for name in clf.labels])
            continue
        if isinstance(res, Failure):
            failures.append(res.to_dict())
            predicted.append(None)
            continue
        predicted.append(res.label)
        kept.append(path)
        y_true.append(truth)
        probs.append([res.probabilities[name] for name in clf.labels])
        all_y.append(truth)
        all_p.append(probs[-1])
        scores.append(res.domain.score if res.domain is not None else None)
    n = len(clf.labels)
    return LabelledOutputs(tuple(kept), np.asarray(y_true, dtype=np.int64),
                           np.asarray(probs, dtype=np.float64).reshape(len(kept), n),
                           tuple(predicted), tuple(failures), tuple(refused), np.asarray(all_y, dtype=np.int64),
                           np.asarray(all_p, dtype=np.float64).reshape(len(all_y), n),
                           None if not scores or scores[0] is None else np.asarray(scores, dtype=np.float64))


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
    metrics["domain"] = _coverage(clf, out)
    if keep_predictions:
        metrics["predictions"] = list(out.predicted)
    metrics["model"] = clf.describe()
    metrics["data"] = str(data_dir)
    metrics["decision"] = "threshold" if clf.use_threshold else "argmax"
    return metrics


def _coverage(clf: Classifier, out: LabelledOutputs) -> dict:
    """The domain gate's share of the usable images: refused, coverage, and the metrics on all
    usable images (the refused ones with the class the model would have given) beside the
    metrics on the accepted ones (the report's main figures)."""
    if clf.domain is None:
        return {"gate": "none" if clf.describe()["domain_gate"] == "none" else "off"}
    from .decision import decide

    usable = len(out.y_true) + len(out.refused)
    row = {"gate": "on", "threshold": clf.domain.threshold, "refused": len(out.refused), "accepted": len(out.y_true),
           "coverage": (len(out.y_true) / usable) if usable else None, "refused_images": list(out.refused)}
    if out.all_y is not None and len(out.all_y):
        th = clf.spec.threshold if clf.use_threshold else None
        pred = decide(out.all_probabilities, clf.labels, th)
        row["all_images"] = classification_metrics(out.all_y.tolist(), pred.tolist(), clf.labels, out.all_probabilities)
    return row
