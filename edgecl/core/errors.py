"""User-facing errors.

Anything a user can cause (a bad path, a bad option, a corrupt file) raises
:class:`EdgeclError` with a one-line message that names the file or option and the fix.
The CLI prints it as ``edgecl: error: <message>`` and exits with status 2, without a
traceback.
"""


class EdgeclError(Exception):
    """An error caused by user input; the message is shown to the user as one line."""


def one_line(exc: BaseException) -> str:
    """A library's exception as one short line, for the :class:`EdgeclError` messages that name
    the file and the fix."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
