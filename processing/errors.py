"""Exception types of the data layer.

Every problem with user data raises a subclass of :class:`WSIDataError` (itself a ``ValueError``), so a
caller can catch one type. Messages name the file (and row / key), what is wrong, and the fix.
"""

from __future__ import annotations


class WSIDataError(ValueError):
    """Base class of every data error raised by the package."""


class SlideFormatError(WSIDataError):
    """A slide feature file (H5) is missing, unreadable or violates the data contract."""


class AnnotationError(WSIDataError):
    """An annotation file (CSV / JSON / JSONL) is missing columns, rows, files or texts."""


class PromptError(WSIDataError):
    """A prompt cannot be built: placeholder token missing, or truncation would drop the slide / answer."""


__all__ = ["WSIDataError", "SlideFormatError", "AnnotationError", "PromptError"]
