"""The field types that every spec section shares: names, durations, the frozen model base.

`featureplane.spec` (groups and rules) and `featureplane.jobs` (batch jobs) both build on
these; `parse_duration` is also how settings read a duration.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from featureplane.errors import quote

__all__ = ["NAME", "Name", "SpecDuration", "SpecModel", "parse_duration"]

NAME = r"[A-Za-z0-9_]{1,128}"
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


class SpecModel(BaseModel):
    """A spec object: frozen, and an unknown field is an error (a typo is not ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
