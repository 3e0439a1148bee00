"""On-device part of lungedge: preprocessing, model metadata, the TFLite classifier, metrics
and timing. Depends on numpy, Pillow and a TFLite interpreter (LiteRT or tflite-runtime);
never on TensorFlow.
"""

from .classifier import Classifier, Failure, Prediction, Refusal
from .domain import DomainVerdict
from .errors import ConfigError, ImageError, LungedgeError, MissingDependencyError, ModelError
from .metadata import embed_spec, read_spec, read_spec_from_file
from .metrics import classification_metrics, confusion_matrix
from .preprocess import load_pixels, normalize, preprocess
from .settings import RuntimeSettings
from .spec import ModelSpec, Preprocessing, Threshold

__all__ = [
    "Classifier", "RuntimeSettings", "Prediction", "Failure", "Refusal", "DomainVerdict",
    "LungedgeError", "ImageError", "ModelError", "ConfigError", "MissingDependencyError",
    "ModelSpec", "Preprocessing", "Threshold",
    "preprocess", "load_pixels", "normalize",
    "read_spec", "read_spec_from_file", "embed_spec",
    "classification_metrics", "confusion_matrix",
]
