"""Errors raised for bad input. Each message is one line that quotes what was received."""


class LungedgeError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""


class ImageError(LungedgeError):
    """An image could not be read or is not usable (missing, empty, corrupt, too large...)."""


class ModelError(LungedgeError):
    """A model file could not be loaded or run, or does not match its labels/metadata."""


class ConfigError(LungedgeError):
    """A configuration value (recipe, option, metadata field) is invalid."""


class MissingDependencyError(LungedgeError):
    """An optional dependency (TensorFlow, LiteRT, matplotlib...) is not installed."""
