"""Conversion: Keras models to TFLite variants carrying lungedge metadata, with a quantisation report."""
