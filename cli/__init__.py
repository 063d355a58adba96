"""The `featureplane` command line: one entry point, a subcommand per job.

`main` installs the graceful-stop handlers of the long-running commands
before anything slow is imported, parses the arguments (`parser`), runs the
command (`commands`) and turns featureplane's errors into one line on stderr
and an exit status: 1 for an error, 2 for a bad flag or FEATUREPLANE_*
variable.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from featureplane import lifecycle

__all__ = ["main"]

# Commands that stop gracefully on SIGTERM. Their handlers go in before anything
# else (pydantic, Bytewax and the other commands' modules take ~1.5 s to import):
# a SIGTERM then was the default action, exit -15 instead of a clean 0.
_GRACEFUL = frozenset({"up", "ingest", "retry"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run `featureplane ARGV...`; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if _command_of(argv) in _GRACEFUL:
        lifecycle.install_stop_handlers()
    from featureplane.cli.flags import BadSettingError, unknown_variables
    from featureplane.cli.parser import build_parser, settings_models
    from featureplane.errors import FeatureplaneError, SpecError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
    )
    for line in unknown_variables(os.environ, settings_models()):
        logging.getLogger(__name__).warning("%s", line)
    try:
        return int(args.run(args))
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 1
    except BadSettingError as exc:
        print(f"featureplane: bad setting: {exc}", file=sys.stderr)
        return 2
    except FeatureplaneError as exc:
        print(f"featureplane: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _command_of(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)
