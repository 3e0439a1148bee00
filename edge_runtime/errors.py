"""Errors raised for bad input. Each message is one line that quotes what was received.

The command line maps them to exit codes by one rule: ``ConfigError`` and
``MissingDependencyError`` mean the command line (an option, a recipe, the install) is wrong
(exit 2); every other ``LungedgeError`` means a model or an input could not be used (exit 1).
"""


class LungedgeError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""


class InputError(LungedgeError):
    """An input file or folder (images, labels, data folder) is missing or cannot be used."""


class ImageError(InputError):
    """An image could not be read or is not usable (missing, empty, corrupt, too large...)."""


class ModelError(LungedgeError):
    """A model file could not be loaded or run, or does not match its labels/metadata."""


class OutputError(LungedgeError):
    """The model's output for one input cannot be used (NaN or infinite values)."""


class WriteError(LungedgeError):
    """A result or artefact could not be written (disk full, read-only...); no partial file is left."""


class ConfigError(LungedgeError):
    """A configuration value (recipe, option, metadata field) is invalid."""


class MissingDependencyError(LungedgeError):
    """An optional dependency (TensorFlow, LiteRT, matplotlib...) is not installed."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), cut to
    ``limit`` characters: what a one-line error quotes of a library's exception."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]

