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

import errno
import re


class UserError(ValueError):
    """The user's input cannot be used as given; the message names the problem and the fix (exit 2)."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (exit 2)."""


class RunStopped(RuntimeError):
    """A job stopped for a reason outside the code (diverged, disk full, read-only, signal); the message says what
    was kept and how to continue."""

    exit_code: int = 1


# errors of the disk being written, not of the code: reported as RunStopped (one line naming the path, exit 1)
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file too large for the file system", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # fixed by freeing space; the others by another place


def disk_errno(err: BaseException) -> int | None:
    """The errno of a disk error behind ``err`` (one of :data:`DISK_ERRORS`), else None: an ``OSError`` in its
    chain (torch.save wraps it in a RuntimeError), or the ``(os error N)`` that safetensors' Rust writer quotes in a
    ``SafetensorError``, which carries no errno."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_ERRORS:
            return cur.errno
        if type(cur).__name__ == "SafetensorError":
            found = re.search(r"\(os error (\d+)\)", str(cur))
            if found and int(found.group(1)) in DISK_ERRORS:
                return int(found.group(1))
        cur = cur.__cause__ or cur.__context__
    return None
