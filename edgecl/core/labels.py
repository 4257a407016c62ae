"""Class labels: the one place they are validated, and the safe way to show untrusted text.

A label names a class everywhere a person reads it (the overlay, JSON lines, ``--list``, the web
page, the engine's classes.json), so it must be printable text: :func:`check_label` refuses an
empty or blank label, one that is not valid UTF-8 (a file-system name that is not), control and
other invisible format characters (newlines, ANSI escapes, bidirectional overrides), one longer
than :data:`MAX_LENGTH`, and the reserved :data:`UNKNOWN` (what the device says when it rejects a
frame). Used for class folders in training data, ``enroll --name``, ``--rename`` and merged
stores. :func:`shown` renders any untrusted text (a label, a file name that is not UTF-8) for a
one-line message. Standard library only.
"""

from __future__ import annotations

import os
import unicodedata

from .errors import EdgeclError

UNKNOWN = "unknown"
MAX_LENGTH = 128


def shown(text) -> str:
    """``text`` (a str, possibly with undecodable bytes as surrogates, or a path) as one safe
    printable line: undecodable bytes as ``\\xNN``, control and format characters escaped."""
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    else:
        text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def check_label(name, what: str) -> str:
    """``name`` as a label (surrounding spaces removed), or a one-line error naming ``what``
    (the option or folder it came from) and the fix."""
    if not isinstance(name, str):
        raise EdgeclError(f"{what}: a class label must be text, got {type(name).__name__}")
    label = name.strip()
    if not label:
        raise EdgeclError(f"{what}: the class label is empty; give the class a name")
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgeclError(f"{what}: the class label {shown(label)!r} is not valid UTF-8; rename it") from None
    bad = sorted({c for c in label if unicodedata.category(c)[0] == "C"})
    if bad:
        chars = ", ".join(repr(c) for c in bad[:5])
        raise EdgeclError(f"{what}: the class label {shown(label)!r} holds control or invisible characters "
                          f"({chars}); use printable text")
    if len(label) > MAX_LENGTH:
        raise EdgeclError(f"{what}: the class label is {len(label)} characters long; use at most {MAX_LENGTH}")
    if label.lower() == UNKNOWN:
        raise EdgeclError(f"{what}: {UNKNOWN!r} is reserved (the device says it for frames it rejects); "
                          f"choose another label")
    return label
