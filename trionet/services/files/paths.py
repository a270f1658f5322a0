"""Path rules of the files service, as pure functions (no I/O).

The service answers ``ERR forbidden`` for a name that could reach outside
the served root or that names something other than a visible regular file.
The decisions that depend only on text live here, so they can be tested
exhaustively without a file system; :mod:`trionet.services.files` applies
them twice: to the name the client sent, and again to the path the name
resolves to (a symlink inside the root may point anywhere).

A name is a ``/``-separated path relative to the root. It is refused when
it is empty, absolute, has an empty part (``a//b``, a trailing ``/``), a
``..`` or ``.`` part, a part starting with ``.`` (hidden; ``.`` and ``..``
are hidden parts too), a backslash (a Windows separator: refusing it keeps
the meaning of a name the same on every platform), or any control
character (Unicode category ``Cc``: NUL, TAB, CR, ESC, DEL, C1 controls),
or text that is not valid UTF-8 (a file name on disk may be any bytes).
"""

from __future__ import annotations

import enum
import unicodedata

__all__ = [
    "NameProblem",
    "is_hidden_part",
    "listable",
    "name_problem",
    "relative_inside",
    "split_name",
]


class NameProblem(enum.Enum):
    """Why a name is refused (the wire says ``ERR forbidden`` for each)."""

    EMPTY = "empty name"
    ABSOLUTE = "absolute path"
    EMPTY_PART = "empty path part"
    DOT_PART = "'.' or '..' part"
    HIDDEN = "hidden part"
    BACKSLASH = "backslash"
    CONTROL = "control character"
    ENCODING = "not encodable as UTF-8"


def is_hidden_part(part: str) -> bool:
    """True for a path part that is hidden (starts with ``.``; ``.`` and ``..`` too)."""
    return part.startswith(".")


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def _has_surrogate(text: str) -> bool:
    # A file name that is not valid UTF-8 reaches Python as lone surrogates
    # (surrogateescape). It cannot be sent in a UTF-8 line, nor asked for.
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def name_problem(name: str) -> NameProblem | None:
    """Return why ``name`` may not be served, or ``None`` if its text is acceptable.

    Only the text is judged: whether it exists, is a regular file and stays
    inside the root once symlinks are resolved is checked when it is opened.
    """
    if not name:
        return NameProblem.EMPTY
    # Control characters and backslashes are checked before the structure so
    # that, e.g., "/\x00" reports the more specific problem consistently.
    if _has_control(name):
        return NameProblem.CONTROL
    if _has_surrogate(name):
        return NameProblem.ENCODING
    if "\\" in name:
        return NameProblem.BACKSLASH
    if name.startswith("/"):
        return NameProblem.ABSOLUTE
    for part in name.split("/"):
        if not part:
            return NameProblem.EMPTY_PART
        if part in (".", ".."):
            return NameProblem.DOT_PART
        if is_hidden_part(part):
            return NameProblem.HIDDEN
    return None


def split_name(name: str) -> tuple[str, ...]:
    """The parts of an acceptable name; :exc:`ValueError` if :func:`name_problem` objects."""
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"{problem.value}: {name!r}")
    return tuple(name.split("/"))


def relative_inside(root: str, path: str) -> tuple[str, ...] | None:
    """The parts of ``path`` below ``root``, or ``None`` if it is not strictly inside.

    Both must be absolute, normalised paths (as :func:`os.path.realpath`
    returns them), with ``/`` separators. The root itself is not "inside"
    (it is a directory, never a file to serve). Comparison is by whole
    parts, so ``/srv/data2`` is not inside ``/srv/data``.
    """
    if not root.startswith("/") or not path.startswith("/"):
        raise ValueError("root and path must be absolute")
    base = root.rstrip("/")
    prefix = base + "/"
    if not path.startswith(prefix) or len(path) == len(prefix):
        return None
    parts = tuple(path[len(prefix) :].split("/"))
    if any(p in ("", ".", "..") for p in parts):
        # Not a normalised path: refuse rather than guess what it means.
        return None
    return parts


def listable(parts: tuple[str, ...]) -> bool:
    """True if a file found at ``parts`` below the root may be listed and served.

    Used for the resolved location of a file (after symlinks) and for every
    entry ``LIST`` walks: it must be a name ``GET`` would accept, so ``LIST``
    never shows a name that cannot be downloaded (a file name with a
    newline or a backslash in it is left out rather than sent garbled).
    """
    return bool(parts) and name_problem("/".join(parts)) is None
