"""The field types that every spec section shares: names, durations, the frozen model base.

`featureplane.spec` (groups and rules) and `featureplane.jobs` (batch jobs) both build on
these; `parse_duration` is also how settings read a duration.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator

from featureplane.errors import quote

__all__ = [
    "MAX_TAGS",
    "NAME",
    "TAG",
    "Description",
    "Name",
    "Owner",
    "SpecDuration",
    "SpecModel",
    "Tags",
    "parse_duration",
]

NAME = r"[A-Za-z0-9_]{1,128}"
TAG = r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}"
MAX_TAGS = 32
_MAX_DESCRIPTION = 2000
_MAX_OWNER = 128
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all but tab and newline
_TAG = re.compile(TAG)
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(value: Any) -> int:
    """`500ms`, `30s`, `5m`, `2h`, `30d` -> milliseconds."""
    if isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        return int(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(
        f"bad duration {quote(value)} (expected a number and ms, s, m, h or d, e.g. 30s)"
    )


SpecDuration = Annotated[int, PlainValidator(parse_duration)]
"""A duration in a spec file, in milliseconds: always written with its unit (`30s`), so
`ttl: {soft: 30}` is an error, not 30 ms. Settings take bare milliseconds too
(`featureplane.settings.Duration`, parsed by the same `parse_duration`)."""
Name = Annotated[str, Field(pattern=f"^{NAME}$")]


def _text(value: Any, what: str, limit: int, *, one_line: bool) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {quote(value)}")
    text = value.strip()
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text):,} characters, more than {limit:,}")
    bad = _CONTROL.search(text) or (one_line and re.search(r"[\t\n]", text))
    if bad:
        raise ValueError(f"{what} holds the control character {bad.group()!r}")
    return text


def _description(value: Any) -> str:
    return _text(value, "a description", _MAX_DESCRIPTION, one_line=False)


def _owner(value: Any) -> str:
    owner = _text(value, "an owner", _MAX_OWNER, one_line=True)
    if not owner:
        raise ValueError("an owner must not be empty (leave the field out instead)")
    return owner


def _tags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"tags must be a list of strings, got {quote(value)}")
    if len(value) > MAX_TAGS:
        raise ValueError(f"{len(value)} tags, more than {MAX_TAGS}")
    for tag in value:
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise ValueError(
                f"bad tag {quote(tag)} (letters, digits and _ . : / -, at most 64, "
                "starting with a letter or digit)"
            )
    if len(set(value)) != len(value):
        raise ValueError("tags must not repeat")
    return tuple(value)


Description = Annotated[str, PlainValidator(_description)]
"""Free text for people (the catalog shows it): at most 2,000 characters, no control
characters but tabs and newlines; surrounding whitespace (YAML's last newline) dropped."""
Owner = Annotated[str, PlainValidator(_owner)]
"""Who to ask: a team, a person or an address, one line of at most 128 characters."""
Tags = Annotated[tuple[str, ...], BeforeValidator(_tags)]
"""At most 32 distinct labels to find things by (`pii`, `ml:embeddings`)."""


class SpecModel(BaseModel):
    """A spec object: frozen, and an unknown field is an error (a typo is not ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
