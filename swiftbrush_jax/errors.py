"""Turning user mistakes into one clear line and a non-zero exit, instead of a traceback."""

import functools
import sys

EXIT_USER_ERROR = 2


def user_error_types() -> tuple:
    """Exceptions whose message is written for the user: the fix is in the input, not the code."""
    from .checkpoint import CheckpointError
    from .data import PromptSourceError
    from .models import UnsupportedConfigError
    from .pipeline import PipelineError
    from .sharding import ShardingError
    from .weights import WeightsError

    return (CheckpointError, PromptSourceError, UnsupportedConfigError, PipelineError, ShardingError,
            WeightsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def exit_on_user_error(main):
    """Run ``main``; a user error prints ``error: <message>`` on stderr and exits with status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except user_error_types() as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapped
