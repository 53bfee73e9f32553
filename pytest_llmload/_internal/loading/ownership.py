"""Folders this process owns (offload folders, built-in staging folders), and leftovers of dead ones.

Cleanup deletes only what it can prove is its own: a folder holds a marker file on which its owner
keeps an exclusive ``flock`` for as long as it lives; a sweep removes a folder only if the marker is
there and its lock can be taken. Process ids are never compared (they mean nothing across PID
namespaces and containers that share ``/tmp``).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import socket

try:
    import fcntl
except ImportError:  # Windows: no flock, so no proof of ownership; folders are never swept
    fcntl = None  # type: ignore[assignment]

SESSION_PREFIX = "llmload-session-"
MARKER = ".llmload-owner"
_MARKER_MAGIC = b"pytest-llmload owner lock\n"

# -- folders this process owns, and leftovers of dead ones ------------------------------------------
#
# A folder is ours only if it holds the MARKER file that we wrote, and its owner is gone only if the
# flock the owner took on that file can be taken now: the kernel drops the lock with the process, in
# any PID namespace or container that shares the folder. Process ids are not compared at all.

_held: dict[str, int] = {}  # folder -> descriptor of its locked marker, for this process's folders
_held_lock = threading.Lock()


def owned_folder(prefix: str, dir: str | os.PathLike | None = None) -> str:
    """A new folder (``tempfile.mkdtemp``) with this process's marker in it, locked while the process lives.

    Remove it with :func:`remove_owned_folder`; if the process dies first, a later sweep removes it.
    """
    folder = tempfile.mkdtemp(prefix=prefix, dir=dir)
    pending = os.path.join(folder, MARKER + ".new")  # the marker appears under its name only once locked
    try:
        fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        os.write(fd, _MARKER_MAGIC + f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # a filesystem without locks: the marker stays unlockable, so no one else sweeps it
        os.rename(pending, os.path.join(folder, MARKER))
    except BaseException:
        os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    with _held_lock:
        _held[folder] = fd
    return folder


def remove_owned_folder(folder: str | os.PathLike | None) -> None:
    """Remove a folder made by :func:`owned_folder` (holding its lock until it is gone)."""
    if not folder:
        return
    shutil.rmtree(folder, ignore_errors=True)
    release_owned_folder(folder)


def release_owned_folder(folder: str | os.PathLike) -> None:
    """Give up the lock of an owned folder that is gone or has been renamed (a finished built-in)."""
    with _held_lock:
        fd = _held.pop(os.fspath(folder), None)
    if fd is not None:
        os.close(fd)


def session_folder() -> str:
    """A temporary folder for this process's offloaded weights, swept by later runs once this process is gone."""
    return owned_folder(prefix=f"{SESSION_PREFIX}{os.getpid()}-")


def _claim_abandoned(folder: str) -> int | None:
    """The locked marker of ``folder`` if it is provably ours and its owner is gone, else None.

    Without our marker (a user's folder, or one made by an older version) or without flock, nothing is proven.
    """
    if fcntl is None:
        return None
    with _held_lock:
        if folder in _held:  # this process's own (where flock is emulated by per-process locks, as on NFS)
            return None
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return None
        fd = os.open(os.path.join(folder, MARKER), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, len(_MARKER_MAGIC), 0) == _MARKER_MAGIC:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while the owner lives, wherever it runs
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _sweep(parent: str | os.PathLike, wanted) -> list[str]:
    removed = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not wanted(entry):
            continue
        folder = os.path.join(parent, entry)
        fd = _claim_abandoned(folder)
        if fd is None:
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(entry)
    return removed


def sweep_dead_sessions(parent: str | os.PathLike | None = None) -> list[str]:
    """Remove session folders whose owner is gone (a crashed xdist worker, a killed run): only folders with
    this plugin's marker whose lock no live process holds."""
    return _sweep(parent or tempfile.gettempdir(), lambda name: name.startswith(SESSION_PREFIX))


def sweep_dead_staging(parent: str | os.PathLike) -> list[str]:
    """Remove built-in checkpoints half-written by processes that died (``.NAME-PID-xxxx`` with our marker)."""
    return _sweep(parent, lambda name: name.startswith("."))
