"""Command-line options declared from settings fields: each option's default and help text come
from the frozen settings object that holds them (``convert.settings``, ``lungedge.pipeline``)."""

from __future__ import annotations

import dataclasses

import click


def settings_option(cls, name: str, *decls: str, **kwargs):
    """A click option for field ``name`` of the settings class ``cls``.

    Its help text is the field's; so is its default unless the option is a flag (``--no-x`` flags
    invert their field). A tuple default is shown comma-separated, as it is typed.
    """
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    kwargs.setdefault("help", f.metadata["help"])
    if not kwargs.get("is_flag"):
        default = f.default
        kwargs.setdefault("default", ",".join(map(str, default)) if isinstance(default, tuple) else default)
        kwargs.setdefault("show_default", default is not None)
    return click.option(*decls, name, **kwargs)
