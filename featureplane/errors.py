"""The exceptions featureplane raises, under one root.

    FeatureplaneError
    ├── SpecError            a catalog that does not validate (carries every problem)
    ├── ValidationError      a value that does not fit its feature group (malformed input)
    │   └── ItemTooLargeError    an encoded item over 8 KiB
    └── StoreError           a store or cache operation that failed
        └── TransientStoreError  ... and may succeed if retried (timeout, throttling, outage)

HTTP status codes are decided in `serving/`, never here. Every message that
quotes user input quotes it through `quote`, so no input (1 MiB long, nested
10,000 deep, any bytes) can make an error message large or raise while it
is built.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FeatureplaneError",
    "ItemTooLargeError",
    "SpecError",
    "SpecProblem",
    "StoreError",
    "TransientStoreError",
    "ValidationError",
    "quote",
]

_REPR = reprlib.Repr()
_REPR.maxlevel = 3  # [[[...]]]: never recurses with the input's depth
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdict = 4


def quote(value: Any, limit: int = 80) -> str:
    """A short, bounded repr of user input for an error message (at most `limit` chars)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # e.g. int too large to print, a repr that raises
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FeatureplaneError(Exception):
    """Root of every featureplane error."""


@dataclass(frozen=True, slots=True)
class SpecProblem:
    """One problem in a catalog, located as `file:line: field: message`."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class SpecError(FeatureplaneError):
    """A catalog failed validation; `problems` lists all of them."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ValidationError(FeatureplaneError):
    """A value does not fit the spec: the record carrying it is malformed."""


class ItemTooLargeError(ValidationError):
    """An encoded item is larger than the 8 KiB limit."""


class StoreError(FeatureplaneError):
    """A store or cache operation failed."""


class TransientStoreError(StoreError):
    """A store failure worth retrying: timeout, throttling, connection loss."""
