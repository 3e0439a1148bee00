"""The command line's model options, declared once from ``RuntimeSettings``.

Each option sets one field of ``edge_runtime.settings.RuntimeSettings`` and takes its default and
help text from that field. ``model_options`` adds the options every model-loading command has
and hands the command one ``runtime`` argument (a ``RuntimeSettings``) instead of seven; a command that needs only some
of them (``bench``) declares those with ``runtime_option`` and folds them with ``with_runtime``.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import click

from lungedge.edge_runtime.settings import BACKEND_CHOICES, RuntimeSettings

#: settings field -> (the option's flag, its click arguments). A flag whose field defaults to True
#: turns the field off (``--no-threshold`` sets ``use_threshold`` False).
_OPTIONS: Dict[str, Tuple[str, dict]] = {
    "backend": ("--backend", {"type": click.Choice(BACKEND_CHOICES), "show_default": True}),
    "threads": ("--threads", {"type": click.IntRange(min=1)}),
    "labels": ("--labels", {"type": click.Path(dir_okay=False)}),
    "mean": ("--mean", {"type": float, "multiple": True}),
    "std": ("--std", {"type": float, "multiple": True}),
    "use_threshold": ("--no-threshold", {"is_flag": True}),
    "guard": ("--no-guard", {"is_flag": True}),
    "allow_out_of_domain": ("--allow-out-of-domain", {"is_flag": True}),
}
#: The options of every command that loads a model (``--allow-out-of-domain`` is separate: only
#: the commands that answer images have it).
MODEL_FIELDS = ("backend", "threads", "labels", "mean", "std", "use_threshold", "guard")


def _param(field: str) -> str:
    """The name of the option's value among the command's arguments (not a name a command uses
    for its own options: ``bench`` has a ``--threads`` of its own)."""
    return f"runtime_{field}"


def _negates(field: str) -> bool:
    return _OPTIONS[field][1].get("is_flag", False) and RuntimeSettings.default(field) is True


def runtime_option(field: str, note: str = "") -> Callable:
    """The click option that sets ``RuntimeSettings.<field>``: its default and help from the
    field, ``note`` added to the help. Fold its value into ``runtime`` with ``with_runtime``."""
    flag, kwargs = _OPTIONS[field]
    default = False if kwargs.get("is_flag") else RuntimeSettings.default(field)
    text = RuntimeSettings.help(field) + (f" {note}" if note else "")
    return click.option(flag, _param(field), default=default, help=text, **kwargs)


def settings_from_options(values: dict) -> RuntimeSettings:
    """``RuntimeSettings`` from the runtime options' values in ``values`` (a command's keyword
    arguments), removing them from ``values``; options a command does not have keep their default."""
    fields = {}
    for field in _OPTIONS:
        if _param(field) not in values:
            continue
        value = values.pop(_param(field))
        if _negates(field):
            value = not value
        elif _OPTIONS[field][1].get("multiple"):
            value = tuple(value) or None
        fields[field] = value
    return RuntimeSettings(**fields)


def with_runtime(f: Callable) -> Callable:
    """Call the command with ``runtime`` (a ``RuntimeSettings``) in place of the runtime options'
    values (every ``runtime_option`` the command has, wherever it is declared)."""

    @functools.wraps(f)
    def command(*args, **kwargs):
        kwargs["runtime"] = settings_from_options(kwargs)
        return f(*args, **kwargs)

    return command


def model_options(f: Callable) -> Callable:
    """The model options (backend, threads, labels, mean, std, no-threshold, no-guard), folded
    into one ``runtime`` argument."""
    f = with_runtime(f)
    for field in MODEL_FIELDS:
        f = runtime_option(field)(f)
    return f
