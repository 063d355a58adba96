"""Command-line flags generated from the settings models, and models built from parsed flags.

A settings model (pydantic-settings, one docstring a field) is the one place
a setting is declared: `add_flags` turns its fields into flags (the name from
the field, the help from its docstring plus `[VARIABLE, default]`, the type
from its annotation) and `model_from` builds the model from the flags that
were given, the model reading FEATUREPLANE_* variables for the rest, so a
flag wins over a variable. A bad value is a `BadSettingError` naming the flag
or the variable it came from.
"""

from __future__ import annotations

import argparse
import difflib
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import pydantic
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from featureplane.errors import StartupError, quote
from featureplane.settings import DURATION, format_duration

__all__ = [
    "ENV_ONLY",
    "FLAG_NAMES",
    "BadSettingError",
    "add_flags",
    "env_name",
    "flag_name",
    "model_from",
    "unknown_variables",
]

FLAG_NAMES = {"kafka_bootstrap": "--bootstrap", "kafka_group": "--group"}
"""Fields whose flag the command line spells otherwise than `--field-name`."""

ENV_ONLY = frozenset({"token", "kafka_config"})
"""Secrets read from their variable only: a flag would show them to anyone running `ps`.
Their values are never quoted in an error either."""

M = TypeVar("M", bound=BaseSettings)


class BadSettingError(StartupError):
    """A flag or FEATUREPLANE_* variable whose value does not fit its setting."""


class _Adds(Protocol):
    """A parser or an argument group."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action: ...


def flag_name(field: str) -> str:
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def env_name(model: type[BaseSettings], field: str) -> str:
    return f"{model.model_config.get('env_prefix', '')}{field}".upper()


def _dest(model: type[BaseSettings], field: str) -> str:
    # Namespaced by model: two models of one command may share a field name.
    return f"{model.__name__}:{field}"


def add_flags(
    parser: _Adds,
    model: type[BaseSettings],
    fields: Iterable[str],
    shown_defaults: Mapping[str, object] | None = None,
) -> None:
    """A flag for each of `fields` of `model`; `shown_defaults` overrides the default the help
    names (where a command's default differs from the model's)."""
    for name in fields:
        if name in ENV_ONLY:
            raise ValueError(f"{name} is a secret: read from {env_name(model, name)} only")
        info = model.model_fields[name]
        shown = (shown_defaults or {}).get(name, info.default)
        kwargs: dict[str, Any] = {
            "dest": _dest(model, name),
            "default": None,  # not given: the variable or the model's default applies
            "help": _help(info, env_name(model, name), shown).replace("%", "%%"),
        }
        kind = _kind(info)
        if kind is bool:  # --x and --no-x: a flag can turn off what a variable or default set
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = "DURATION" if DURATION in info.metadata else name.upper()
            if kind in (int, float):
                kwargs["type"] = kind
            elif isinstance(kind, tuple):
                kwargs["choices"] = kind
                del kwargs["metavar"]
        parser.add_argument(flag_name(name), **kwargs)


def _kind(info: FieldInfo) -> type | tuple[str, ...]:
    """bool, int or float for argparse to convert; a Literal's choices; else str (pydantic
    converts and checks it: a Duration, a Path, a secret)."""
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(a) for a in args)
    if len(args) == 1 and typing.get_origin(annotation) is not None:  # X | None
        annotation = args[0]
    if DURATION in info.metadata:
        return str
    if annotation in (bool, int, float):
        return typing.cast(type, annotation)
    return str


def _help(info: FieldInfo, env: str, default: object) -> str:
    text = " ".join((info.description or "").split())
    if default is None or default is PydanticUndefined:
        return f"{text} [{env}]"
    if DURATION in info.metadata and isinstance(default, int):
        shown = format_duration(default)
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    else:
        shown = str(default)
    return f"{text} [{env}, {shown}]"


def model_from(model: type[M], args: argparse.Namespace) -> M:
    """The model from the flags given for it in `args`; its variables and defaults fill the rest."""
    prefix = _dest(model, "")
    given = {
        k.removeprefix(prefix): v
        for k, v in vars(args).items()
        if k.startswith(prefix) and v is not None
    }
    try:
        return model(**given)
    except pydantic.ValidationError as exc:
        problems = [_problem(model, error, given) for error in exc.errors()]
        raise BadSettingError("; ".join(problems)) from None


def _problem(model: type[BaseSettings], error: Any, given: Mapping[str, object]) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    where = flag_name(field) if field in given else env_name(model, field)
    message = str(error["msg"]).removeprefix("Value error, ")
    if "bad duration" in message or field in ENV_ONLY:  # quoted already, or a secret
        return f"{where}: {message}"
    return f"{where} {quote(error.get('input'))}: {message}"


def unknown_variables(
    environ: Mapping[str, str], models: Sequence[type[BaseSettings]], prefix: str = "FEATUREPLANE_"
) -> list[str]:
    """One line for each `prefix` variable no model reads (a typo is otherwise ignored)."""
    known = {env_name(m, f) for m in models for f in m.model_fields}
    lines = []
    for name in sorted(environ):
        if name.startswith(prefix) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"{name} is not a featureplane setting and is ignored{hint}")
    return lines
