"""Conversion: Keras models to TFLite variants carrying lungedge metadata, with a quantisation report.

Public surface (TensorFlow is imported only inside the conversion functions):
``VARIANTS``, ``get_variant``, ``parse_variants``, ``convert_keras_model``, ``convert_run``.
"""

from .keras_convert import convert_keras_model
from .run import convert_run
from .variants import DEFAULT_VARIANTS, VARIANTS, Variant, get_variant, parse_variants

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "Variant", "get_variant", "parse_variants",
           "convert_keras_model", "convert_run"]
