"""Conversion: Keras models to TFLite variants carrying lungedge metadata, with a quantisation report.

Public surface (TensorFlow is imported only inside the conversion functions):
``VARIANTS``, ``get_variant``, ``parse_variants``, ``convert_keras_model``, ``convert_run``, ``ConvertSettings``.
"""

import importlib

# Imported on first use (PEP 562), so that `lungedge classify` does not pay for them.
_LAZY = {'convert_keras_model': 'keras_convert', 'convert_run': 'conversion', 'ConvertSettings': 'settings', 'DEFAULT_VARIANTS': 'variants', 'VARIANTS': 'variants', 'Variant': 'variants', 'get_variant': 'variants', 'parse_variants': 'variants'}

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "Variant", "get_variant", "parse_variants",
           "convert_keras_model", "convert_run", "ConvertSettings"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
