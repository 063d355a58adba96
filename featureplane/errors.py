"""The exceptions featureplane raises, under one root.

    FeatureplaneError
    ├── SpecError            a catalog that does not validate (carries every problem)
    │   └── SpecNotFoundError    a spec path with no spec files (featureplane/spec.py)
    ├── ValidationError      a value that does not fit its feature group (malformed input)
    │   ├── MalformedError       an event that cannot be decoded (bad JSON, missing field)
    │   ├── ItemTooLargeError    an encoded item over 8 KiB
    │   └── UnknownGroupError    a feature group the catalog lacks (`.group`)
    ├── StoreError           a store or cache operation that failed
    │   ├── TransientStoreError  ... and may succeed if retried (timeout, throttling, outage)
    │   └── NotStartedError      a store or cache used before `start()` or after `aclose()`
    ├── StartupError         a process cannot start: a port taken, a broker that does not
    │   │                    answer (the message says in one line what to change)
    │   ├── ServiceError         a local service (the embedded broker) missing or not
    │   │                        starting (cli/broker.py)
    │   └── BadSettingError      a flag or FEATUREPLANE_* variable whose value does not
    │                            fit its setting (cli/flags.py)
    ├── OnDemandError        an on-demand group's function failed: `.group`, `.message`
    │                        (serving/ondemand.py)
    └── ApiError             an HTTP request the API refuses: `.status`, `.code`,
                             `.message` (serving/api.py)

ServiceError, BadSettingError, OnDemandError and ApiError are defined beside
the code that raises them, under this root; HTTP status codes are decided in
`serving/`, never here. Every message that quotes user input quotes it
through `quote`, so no input (1 MiB long, nested 10,000 deep, any bytes) can
make an error message large or raise while it is built.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FeatureplaneError",
    "ItemTooLargeError",
    "MalformedError",
    "NotStartedError",
    "SpecError",
    "SpecProblem",
    "StartupError",
    "StoreError",
    "TransientStoreError",
    "UnknownGroupError",
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


class MalformedError(ValidationError):
    """An event cannot be decoded: bad JSON, a missing or mistyped envelope field."""


class ItemTooLargeError(ValidationError):
    """An encoded item is larger than the 8 KiB limit."""


class UnknownGroupError(ValidationError):
    """A feature group the catalog does not declare."""

    def __init__(self, group: str) -> None:
        self.group = group
        super().__init__(f"unknown feature group {quote(group)}")


class StoreError(FeatureplaneError):
    """A store or cache operation failed."""


class TransientStoreError(StoreError):
    """A store failure worth retrying: timeout, throttling, connection loss."""


class NotStartedError(StoreError):
    """A store or cache was used before `start()` (or after `aclose()`)."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"{what} is not started: call start() or use `async with`")


class StartupError(FeatureplaneError):
    """A process cannot start; the message says in one line what to change."""
