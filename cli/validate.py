"""Check spec files (one YAML file or a folder of them) and print every problem.

Each problem is one line, `file:line: field: message`. Exit status 0 when the
catalog is valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from featureplane.errors import SpecError
from featureplane.spec import load_catalog

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a spec YAML file or a folder of them")


def run(args: argparse.Namespace) -> int:
    try:
        catalog = load_catalog(args.path)
    except SpecError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s) in {args.path}", file=sys.stderr)
        return 1
    print(
        f"{args.path}: {len(catalog.groups)} feature groups, {len(catalog.rules)} ingestion "
        f"rules, topics: {', '.join(catalog.topics) or '-'}"
    )
    return 0
