"""The one exception type the converter raises for bad input."""

from __future__ import annotations


class ConversionError(Exception):
    """A checkpoint or option the converter cannot use; the message is one line."""
