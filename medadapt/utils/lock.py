"""One process per run folder: a lock file holding its owner's pid and host.

``with folder_lock(path, what):`` takes ``path/.medadapt.lock`` for the block. The lock is an advisory
``flock`` on that file, so the kernel releases it when its owner exits in any way (a killed process included)
and the next run simply takes it over; the file's content (pid, host, command, start time) only names the
owner in the refusal. A second process, ``--resume`` or not, is refused with one line naming the owner, before
it touches anything. Within one process the lock is re-entrant per folder (a workflow that calls another on
the same folder does not lock itself out). A folder the lock created and nothing else wrote to (a run refused
for a user mistake) is removed again, so a refused run leaves nothing behind.

``flock`` is local to a machine on most network file systems: two hosts sharing a folder are not kept apart,
which is why the pid is recorded with its host.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from medadapt.errors import MedadaptError

LOCK_NAME = ".medadapt.lock"

_held: dict[str, int] = {}  # resolved folder -> depth, the folders this process holds
_guard = threading.Lock()


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"process {info['pid']} on {info['host']} (since {info['started']}: "
                f"{info.get('command') or 'medadapt'})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run folder") -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (the folder is created); refuse with a :class:`MedadaptError`
    naming the owner if a live process holds it. Yields the lock file's path."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MedadaptError(f"{folder}: is a file, not a folder; choose a folder for the {what}")
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # what this lock makes, innermost first
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    lock_path = folder / LOCK_NAME
    with _guard:
        if key in _held:
            _held[key] += 1
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        try:
            yield lock_path
        finally:
            with _guard:
                _held[key] -= 1
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MedadaptError(f"{folder}: this {what} is in use by {_owner(lock_path)}; wait for it to finish "
                                "or stop it, or use another folder") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        with _guard:
            _held[key] = 1
        try:
            yield lock_path
        finally:
            with _guard:
                _held.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # an unlocked, empty file: nobody holds the folder
                if created and os.listdir(folder) == [LOCK_NAME]:  # a run that stopped before writing
                    lock_path.unlink()                             # anything leaves no folder behind
                    for made in created:
                        made.rmdir()  # OSError once a folder holds something else: the rest stay
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created) for the block, waiting while another process
    holds it: one writer of a shared cache entry, the others wait and then read what it wrote."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def locks_folder(arg: str = "out", what: str = "run folder"):
    """Decorator: each call holds the folder passed as argument ``arg`` (:func:`folder_lock`) while it runs.
    Under torchrun only rank 0 (``RANK``) takes it: the ranks of one run share its folder."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            folder = signature.bind_partial(*args, **kwargs).arguments.get(arg)
            if folder is None or int(os.environ.get("RANK", "0") or 0) != 0:
                return fn(*args, **kwargs)
            with folder_lock(folder, what):
                return fn(*args, **kwargs)
        return wrapper
    return decorate
