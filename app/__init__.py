"""lungedge: lung-image classifiers from training to a cheap device.

The on-device API, importable without TensorFlow (the runtime is imported on first use)::

    from lungedge import Classifier

    with Classifier.from_file("model_int8.tflite") as clf:
        result = clf.classify("xray.jpeg")
        print(result.label, result.score)
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it (imported lazily: ``import lungedge`` stays light)
_LAZY = {
    "Classifier": "lungedge.edge_runtime.classifier",
    "Prediction": "lungedge.edge_runtime.classifier",
    "Category": "lungedge.edge_runtime.classifier",
    "Failure": "lungedge.edge_runtime.classifier",
    "Refusal": "lungedge.edge_runtime.classifier",
    "RuntimeSettings": "lungedge.edge_runtime.settings",
    "DomainVerdict": "lungedge.edge_runtime.domain",
    "ModelSpec": "lungedge.edge_runtime.spec",
    "LungedgeError": "lungedge.edge_runtime.errors",
    "ModelError": "lungedge.edge_runtime.errors",
    "ImageError": "lungedge.edge_runtime.errors",
    "InputError": "lungedge.edge_runtime.errors",
    "ConfigError": "lungedge.edge_runtime.errors",
    "MissingDependencyError": "lungedge.edge_runtime.errors",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from lungedge.edge_runtime.classifier import Category, Classifier, Failure, Prediction, Refusal
    from lungedge.edge_runtime.domain import DomainVerdict
    from lungedge.edge_runtime.settings import RuntimeSettings
    from lungedge.edge_runtime.errors import (ConfigError, ImageError, InputError, LungedgeError, MissingDependencyError,
                                     ModelError)
    from lungedge.edge_runtime.spec import ModelSpec


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lungedge' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
