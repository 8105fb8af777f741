"""Turning user mistakes into one clear line and a non-zero exit, instead of a traceback."""

import argparse
import functools
import sys

EXIT_USER_ERROR = 2


class UsageError(ValueError):
    """Command-line input a program cannot act on (bad flag combination, unusable output path)."""


class TrainingDiverged(RuntimeError):
    """A run whose updates stayed non-finite too many steps in a row; the fix is in its inputs
    (learning rate, teacher weights), and its last good checkpoint is kept."""


def user_error_types() -> tuple:
    """Exceptions whose message is written for the user: the fix is in the input, not the code.

    Of the OS errors only those that name a wrong path are; any other I/O failure (a lost mount, a disk
    error) keeps its traceback, which is what its report needs."""
    from .files.checkpoint import CheckpointError
    from .data.prompts import PromptSourceError
    from .models import UnsupportedConfigError
    from .files.pipeline import PipelineError
    from .parallel.sharding import ShardingError
    from .files.weights import WeightsError

    return (CheckpointError, PromptSourceError, UnsupportedConfigError, PipelineError, ShardingError,
            WeightsError, UsageError, TrainingDiverged, FileNotFoundError, NotADirectoryError, IsADirectoryError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands: a bad flag is one ``error:`` line and status 2, as every other user
    error; the usage is one ``--help`` away. The description and example come from the module docstring."""

    def __init__(self, prog: str, doc: str, **kwargs):
        head, rest = doc.split("\n\n", 1)
        super().__init__(prog=prog, description=head, epilog="example:\n" + rest,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def exit_on_user_error(main):
    """Run ``main``; a user error prints ``error: <message>`` on stderr and exits with status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except user_error_types() as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapped


def parse_flags_or_exit(argv):
    """absl flag parsing for ``app.run(flags_parser=...)``: a bad flag or config override is one line, exit 2."""
    import re

    from absl import flags

    try:
        return flags.FLAGS(argv)
    except SystemExit:
        # absl prints --help and exits with status 1; a help asked for is a success, as in the other commands.
        if any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
            sys.exit(0)
        raise
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e).strip("\"'")
        unknown = re.fullmatch(r"'?([\w.]+)'?", message)
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        if isinstance(e, (AttributeError, KeyError)) and unknown:
            culprit = next((a for a in overrides if unknown.group(1) in a), "a --config override")
            message = (f"unknown config key {unknown.group(1)!r} in {culprit}; "
                       "the keys are those of the config file (see swiftbrush_jax/config_base.py)")
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        text = lines[0] if lines else type(e).__name__
        if text.endswith(":") and len(lines) > 1:  # absl's "Error whilst parsing config file:", then the cause
            text = f"{text} {lines[-1]}"
        print(f"error: {text}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
