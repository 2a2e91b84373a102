"""The one exception type for bad input: a one-line message and the process exit code."""
from __future__ import annotations


class UsageError(Exception):
    """Bad flags, missing data or an unusable checkpoint: one `error: ...` line, exit code 2."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
