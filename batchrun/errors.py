"""The exceptions the CLI expects: each carries its exit code and a one-line message.

Anything else reaching the CLI is a bug and is shown as one, with a traceback
only under BATCHRUN_DEBUG=1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_STATE = 3
EXIT_INTERRUPTED = 130


class BatchrunError(Exception):
    """Base of every error batchrun raises on purpose."""

    exit_code = EXIT_RUN_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ManifestError(BatchrunError):
    """The manifest is invalid; `problems` holds one line per problem, in file order."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UsageError(BatchrunError):
    exit_code = EXIT_USAGE


class StateError(BatchrunError):
    """The state file cannot be used: corrupt, foreign, newer, unsafe path."""

    exit_code = EXIT_STATE


class LockHeldError(StateError):
    """Another apply holds the state lock."""


class ApiError(BatchrunError):
    """The service answered with an error (or could not be reached).

    `status` is the HTTP status, or None when no answer came at all.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(ApiError):
    """401/403 from the API: the batch stops at once, nothing will work."""


class AmbiguousError(ApiError):
    """A non-idempotent request may or may not have been processed (lost response)."""


class TransferError(BatchrunError):
    """An upload or download failed; the message never contains the presigned URL."""

    def __init__(self, message: str, *, expired: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.expired = expired
        self.status = status


class DiskError(BatchrunError):
    """Writing a file failed (disk full, read-only, ...): the batch stops submitting."""

    exit_code = EXIT_STATE
