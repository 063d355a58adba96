"""`featureplane validate`: check spec files and print every problem, one a line.

It imports the spec model and nothing of ingestion or serving, so it starts
fast and runs where only the specs are (a CI job, a pre-commit hook).
"""

from __future__ import annotations

import sys
from pathlib import Path

from featureplane.errors import SpecError
from featureplane.spec import SpecNotFoundError, load_catalog

__all__ = ["run"]


def run(path: Path) -> int:
    """0 when the catalog at `path` is valid; else 1, each problem printed as
    `file:line: field: message`. A path with no spec raises `SpecNotFoundError`, whose
    message every command prints the same way."""
    try:
        catalog = load_catalog(path)
    except SpecNotFoundError:
        raise
    except SpecError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s) in {path}", file=sys.stderr)
        return 1
    print(
        f"{path}: {len(catalog.groups)} feature groups, {len(catalog.rules)} ingestion "
        f"rules, {len(catalog.jobs)} batch jobs, topics: {', '.join(catalog.topics) or '-'}"
    )
    return 0
