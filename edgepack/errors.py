"""The error tree shared by host and device.

Every error carries the process exit code that goes with it (as click's exceptions do) and a message
that says what is wrong and what to do next. The CLIs print ``error: <message>`` on one line and exit
with ``exit_code``; they never show a traceback for a user mistake.
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Base of all edgepack errors; ``exit_code`` 1 means an operation failed."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(EdgepackError):
    """Bad usage or bad input given by the user (exit code 2)."""

    exit_code = 2


class InputFileError(UsageError):
    """An input file is missing, unreadable or of an unknown format."""


class ProfileError(UsageError):
    """A device profile is unknown or invalid."""


class DataError(UsageError):
    """Calibration/validation/prediction data does not match the model."""


class BundleError(EdgepackError):
    """A bundle is malformed, tampered with, or fails verification; nothing was installed."""

    exit_code = 1


class SignatureError(BundleError):
    """A bundle signature is missing, wrong, or made with another key."""


class ConversionError(EdgepackError):
    """Export or quantization failed for a reason that is not the user's input."""


class GateError(EdgepackError):
    """No candidate met the accuracy/latency budget of a profile."""


class RuntimeBackendError(EdgepackError):
    """A runtime (ONNX Runtime, LiteRT) could not load or run a model."""


class StoreError(EdgepackError):
    """The agent's model store refused an operation (nothing was changed)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``exc``'s message (at most ``limit`` characters), or its type name.

    Third-party libraries (ONNX Runtime, torch, LiteRT) raise multi-line messages with C++ stack
    dumps; a one-line error keeps only what says what went wrong.
    """
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
