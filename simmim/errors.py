"""The toolkit's own exception types: what the command line shows as a one-line error, and what it shows as a bug.

* :class:`UserError` (and its subclasses): the user's input cannot be used as given: a flag, a config value, a file
  or folder they named, their data. Raised where the input is checked, with a message that names the problem and
  the fix. ``simmim`` prints it as one line and exits 2.
* :class:`RunStopped`: a job stopped for a reason outside the code: a diverged loss, a full or read-only disk, a
  signal. The message says what was saved and how to continue. One line; exit :attr:`RunStopped.exit_code` (1, or
  128 + the signal number for a signal, as shells report it).
* Anything else is a bug (in the toolkit or a dependency): the full traceback, exit 1, never dressed as a user
  error. This is why library code never raises a bare ``ValueError`` for bad input that the CLI should report.

``UserError`` subclasses ``ValueError`` (and :class:`InputNotFoundError` also ``FileNotFoundError``) so Python
callers that caught those before keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """The user's input cannot be used as given; the message names the problem and the fix (exit 2)."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (exit 2)."""


class RunStopped(RuntimeError):
    """A job stopped for a reason outside the code (diverged, disk full, read-only, signal); the message says what
    was kept and how to continue."""

    exit_code: int = 1
