"""Dropping root: ``--user NAME`` and ``--group NAME``.

A service started as root (to bind a port below 1024, or to read a TLS key
only root may read) should not keep root while it talks to clients. The
runner opens every socket and reads the TLS files first, then calls
:func:`drop_privileges`: supplementary groups, group, then user, in that
order (once the user is changed, the right to change groups is gone).
Worker processes are started by a parent that stays root (it never reads a
client's byte; it needs root to start the next generation's workers, which
read the key again on a reload) and drop by themselves before serving.
"""

from __future__ import annotations

import grp
import os
import pwd

import attrs

__all__ = ["Identity", "PrivilegeError", "drop_privileges", "resolve_identity"]


class PrivilegeError(ValueError):
    """An unknown user or group, or a switch the process is not allowed to make."""


@attrs.frozen
class Identity:
    """Who to become: names (for messages) and numbers."""

    user: str
    uid: int
    group: str
    gid: int


def resolve_identity(user: str, group: str | None = None) -> Identity:
    """Look ``user`` (and ``group``, default: the user's own) up; a clear error if unknown."""
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise PrivilegeError(f"--user {user}: no such user") from None
    if group is None:
        gid = entry.pw_gid
        try:
            group_name = grp.getgrgid(gid).gr_name
        except KeyError:
            group_name = str(gid)
    else:
        try:
            found = grp.getgrnam(group) if not group.isdigit() else grp.getgrgid(int(group))
        except KeyError:
            raise PrivilegeError(f"--group {group}: no such group") from None
        gid, group_name = found.gr_gid, found.gr_name
    return Identity(entry.pw_name, entry.pw_uid, group_name, gid)


def drop_privileges(who: Identity) -> bool:
    """Become ``who`` for good (real, effective and saved ids); True if anything changed.

    A process that already is ``who`` changes nothing (a worker started by
    a parent that had dropped, or ``--user`` naming oneself). Otherwise it
    must be root: :class:`PrivilegeError` says so.
    """
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (who.uid,) * 2 + (who.gid,) * 2:
        return False
    if os.geteuid() != 0:
        raise PrivilegeError(
            f"--user {who.user}: only root can switch users (running as uid {os.geteuid()})"
        )
    try:
        os.setgroups(os.getgrouplist(who.user, who.gid))
        os.setresgid(who.gid, who.gid, who.gid)
        os.setresuid(who.uid, who.uid, who.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user {who.user}: {exc.strerror}") from None
    if who.uid != 0:
        # Make sure there is no way back (a saved id left at 0 would be one).
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - the kernel would have to ignore setresuid
            raise PrivilegeError(f"dropped to {who.user} but could become root again")
    return True
