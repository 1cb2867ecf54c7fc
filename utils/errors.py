"""The one base class of errors caused by the user's input, and the exit code for them.

Every entry point (train.py and the tools) prints a `UserError` as one line
`error: <message>` on stderr and exits with EXIT_USER_ERROR; any other exception
is a bug and keeps its traceback. The subclasses (ConfigError, DataError,
CheckpointError, VerificationSetError, EmbedderError, ...) live beside the code
that raises them and also derive from the built-in type callers used to catch.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, verification set, model
    file, command line). The message names the file, key or value and what to do."""
