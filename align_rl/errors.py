"""Errors that name the problem and the fix.

Every entry point catches :class:`AlignRLError`, prints ``error: <message>`` and exits with
status 2, so bad input never ends in a traceback or a half-written output.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar


class AlignRLError(Exception):
    """Base class of the project's user-facing errors."""


class InputError(AlignRLError):
    """Bad input data: a missing variable or level, NaNs, a wrong grid, a broken coordinate."""


class ConfigError(AlignRLError):
    """A bad configuration value or an unknown key."""


class CheckpointError(AlignRLError):
    """A checkpoint that is missing or does not match the configuration it is loaded with."""


class IntegrityError(AlignRLError):
    """Stored data that fails its own checks (a lost commit, a missing chunk, a wrong checksum):
    the message names the damaged part and how to recover."""


class OwnershipError(AlignRLError):
    """A folder the project would replace or delete that it did not create (no marker file)."""


F = TypeVar("F", bound=Callable[..., int | None])


def cli_errors(main: F) -> F:
    """Wrap a CLI ``main`` so that project errors print one line and exit with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except AlignRLError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
