"""``python -m swiftbrush_jax.paper_eval``: the same command line as ``evaluate --suite coco2014|hps``."""

import sys

from ..errors import exit_on_user_error
from ..evaluators.paper_suites import main

if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
