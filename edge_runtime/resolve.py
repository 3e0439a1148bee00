"""The ``ModelSpec`` a classifier runs with: the file's lungedge record, else its standard
``TFLITE_METADATA`` record (MediaPipe, Task Library), with the caller's labels, mean and std over it.
The input size always comes from the model's input tensor."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .errors import ModelError
from .labels import disambiguate, read_labels, replace_labels
from .quant import tensor_quantization
from .settings import DEFAULT_MEAN_STD, RuntimeSettings
from .spec import ModelSpec, Preprocessing
from .tflite_metadata import StandardMetadata


def resolve_spec(spec: Optional[ModelSpec], standard: Optional[StandardMetadata], standard_error: Optional[str],
                 input_details: dict, classes: int, settings: RuntimeSettings,
                 name: str) -> Tuple[ModelSpec, Optional[str]]:
    """(the spec to run with, where it came from: "lungedge", "TFLITE_METADATA" or None for the caller's labels).

    Args:
        spec: the file's lungedge record, or None.
        standard, standard_error: the file's standard record, or why it could not be read.
        input_details: the interpreter's input tensor (shape (1, H, W, C), dtype, quantisation).
        classes: the model's number of outputs.
        settings: the caller's ``labels``, ``mean`` and ``std``.
        name: the file, for messages.

    Raises:
        ModelError: no labels anywhere, labels that do not match the output, or a record whose
            input size differs from the model's.
        InputError: the labels file cannot be used.
    """
    shape = tuple(int(x) for x in input_details["shape"])
    labels = read_labels(settings.labels) if settings.labels is not None else None
    if spec is None:
        spec, source = _without_record(standard, standard_error, input_details, shape, labels, settings, name)
    else:
        spec, source = _with_record(spec, shape, labels, settings, name), "lungedge"
    if spec.num_classes != classes:
        raise ModelError(f"{spec.num_classes} labels given but the model has {classes} outputs: {name!r}")
    return spec, source


def _with_record(spec: ModelSpec, shape: tuple, labels, settings: RuntimeSettings, name: str) -> ModelSpec:
    """The lungedge record with the caller's labels, mean and std; its input size checked against the model's."""
    mean, std = settings.mean, settings.std
    if labels is not None:
        spec = replace_labels(spec, labels)
    if mean or std:
        spec = spec.replace(preprocessing=Preprocessing(**{**spec.preprocessing.to_dict(),
                                                          **({"mean": tuple(mean)} if mean else {}),
                                                          **({"std": tuple(std)} if std else {})}))
    p = spec.preprocessing
    h, w, c = shape[1], shape[2], shape[3]
    if (p.height, p.width, p.channels) != (h, w, c):
        raise ModelError(f"metadata says input {p.height}x{p.width}x{p.channels} but the model takes {h}x{w}x{c}: {name!r}")
    return spec


def _without_record(standard, standard_error, input_details: dict, shape: tuple, labels, settings: RuntimeSettings,
                    name: str) -> Tuple[ModelSpec, Optional[str]]:
    """A spec for a file without a lungedge record: labels from the caller or the standard record."""
    std_mean, std_std = standard_normalisation(input_details, standard)
    if labels is None and standard is not None and standard.labels:
        labels = disambiguate(list(standard.labels))
    if labels is None and standard_error:
        raise ModelError(standard_error)
    if labels is None:
        raise ModelError("model has no lungedge metadata and no labels file in standard TFLite metadata, so its "
                         f"labels are unknown: pass labels (--labels FILE): {name!r}")
    mean, std = settings.mean, settings.std
    pre = Preprocessing(height=shape[1], width=shape[2], color_mode="rgb" if shape[3] == 3 else "grayscale",
                        mean=tuple(mean) if mean else std_mean, std=tuple(std) if std else std_std)
    return ModelSpec(labels=tuple(labels), preprocessing=pre), ("TFLITE_METADATA" if standard is not None else None)


def standard_normalisation(input_details: dict,
                           standard: Optional[StandardMetadata]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """mean/std for a model without a lungedge record.

    A quantised uint8 input takes raw pixels in MediaPipe and the Task Library (they ignore
    ``NormalizationOptions`` for it): the tensor's own quantisation is the normalisation.
    A float input uses the standard record's ``NormalizationOptions``; without one, the
    MobileNet default ``DEFAULT_MEAN_STD``.
    """
    if np.dtype(input_details["dtype"]) == np.uint8:
        q = tensor_quantization(input_details)
        if q is not None and q[0] > 0:
            return (float(q[1]),), (1.0 / q[0],)
    channels = input_details["shape"][3]
    info = standard.inputs[0] if standard is not None and standard.inputs else None
    if info is not None and info.mean and info.std and len(info.mean) in (1, channels) \
            and len(info.std) in (1, channels) and all(x > 0 for x in info.std):
        return tuple(info.mean), tuple(info.std)
    return (DEFAULT_MEAN_STD,), (DEFAULT_MEAN_STD,)
