"""User-facing errors.

A :class:`FedPeftError` carries a one-line message that names the problem and, where there is one,
the fix. The CLI prints it without a traceback and exits with status 2.
"""

from __future__ import annotations


class FedPeftError(ValueError):
    """A problem with the user's input or environment, explained in one line."""
