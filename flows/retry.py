"""Not built yet: see the open issues (issues list)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    del p


def run(args: argparse.Namespace) -> int:
    print("featureplane: this command is not built yet", file=sys.stderr)
    return 2
