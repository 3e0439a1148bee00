"""Shared pieces of the click CLI: error handling and exit codes.

Exit codes: 0 all good, 1 some input or stage failed, 2 usage error (bad option or config).
"""

from __future__ import annotations

import functools
import sys

import click

from edge_runtime.errors import ConfigError, LungedgeError, MissingDependencyError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turn library errors into one line on stderr and a meaningful exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, MissingDependencyError) as exc:
            fail(str(exc), EXIT_USAGE)
        except LungedgeError as exc:
            fail(str(exc), EXIT_FAILED)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def parse_int_list(value: str, name: str) -> list:
    try:
        out = [int(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got {value!r}") from None
    if not out or any(x < 1 for x in out):
        raise ConfigError(f"{name} must be positive integers, got {value!r}")
    return out
