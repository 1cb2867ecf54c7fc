"""The one exception family of the data layer.

Every message names the file and, where there is one, the record key or byte offset,
so that a user can find the bad entry without a debugger. `DataError` is a
`utils.errors.UserError`: every entry point prints it as one line.
"""
from __future__ import annotations

from utils.errors import UserError


class DataError(UserError, ValueError):
    """A data set that cannot be used as it is (missing, malformed or inconsistent)."""


class RecordIOError(DataError):
    """A `.rec` / `.idx` pair whose bytes do not follow the RecordIO format."""


class BadImageError(DataError):
    """An image payload that OpenCV cannot decode, or that has the wrong size."""


class LabelError(DataError):
    """A label outside [0, num_classes)."""
