"""The one exception type the library raises for user-facing problems.

The CLI catches :class:`SteerkitError`, prints its message as one red line and exits 1;
``STEERKIT_DEBUG=1`` shows the traceback instead. Messages name the bad value and the fix.
"""


class SteerkitError(Exception):
    """A problem the user can fix: bad input, a missing file, a mismatched direction."""
