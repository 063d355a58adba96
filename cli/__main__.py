"""`python -m featureplane.cli`: the same as the `featureplane` command."""

import sys

from featureplane.cli import main

sys.exit(main())
