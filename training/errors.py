"""Why a run ended early: each reason is one line on stderr and its own process exit code."""
from __future__ import annotations

# What a sample PIL cannot identify reads as (PIL's own message repeats the path or a file object).
UNKNOWN_IMAGE_FORMAT = "not a decodable image (unknown format)"


class RunError(Exception):
    """A run that cannot go on; `main` prints `<label>: <message>` and exits with `exit_code`."""

    label = "error"

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(RunError):
    """Bad flags, missing data or an unusable checkpoint: exit code 2."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message, exit_code)


class DataError(UsageError):
    """A sample that cannot be read (corrupt image or record, vanished file): exit code 2.

    DataLoader workers send exceptions to the main process as `type(message_with_traceback)`;
    this class keeps only the original one-line message, so it reads the same with or without
    workers.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        if "Original Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message, exit_code)


class TrainingDiverged(RunError):
    """A non-finite loss or weight: exit code 3, checkpoints already on disk left as they were."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=3)


class RunInterrupted(RunError):
    """Stopped by SIGTERM/SIGINT after saving a recovery checkpoint: exit code 128 + signal."""

    label = "stopped"
