"""The installed lungedge version, for records in models and reports (no import of the CLI package)."""

from __future__ import annotations


def package_version() -> str:
    """The version of the installed ``lungedge`` distribution ("unknown" when it is not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "unknown"
    try:
        return version("lungedge")
    except PackageNotFoundError:
        return "unknown"
