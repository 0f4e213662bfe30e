"""One writer per folder: the lock that a curation OUT_DIR and a training run folder are held by while a command
writes them.

A lock is the file `<folder>/.dynamicid.lock`, held with `flock` for the life of the open file: the kernel drops
it when the holder ends, however it ends (SIGKILL, a crash, a reboot), so a lock left by a killed run is taken
over by the next one without any guess about whether the holder still runs. The file says who holds it (pid,
host, command, start time) for the message a second command stops with. The file stays (emptied on release):
removing it would let a third command lock a new file while a second still waits on the old one.

A folder the lock created is removed again when the command leaves nothing else in it (it stopped on bad
input). Locking is per process and re-entrant: a process that holds a folder may lock it again (nested calls of the
Python API), the lock is released when the outermost holder finishes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".dynamicid.lock"

_held: dict[Path, tuple[int, int]] = {}  # folder -> (file descriptor, nesting depth) in this process


class FolderInUse(BlockingIOError):
    """Another process holds the folder's lock (an OSError: command lines exit 2 with its one line)."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is starting up"


@contextmanager
def hold_folder(folder: str | Path, what: str) -> Iterator[None]:
    """Hold `folder`'s lock for the block (creating the folder); `FolderInUse` at once when another process
    holds it. `what` names the folder in the message (`OUT_DIR dataset/`, `--output-dir runs/a`)."""
    folder = Path(os.path.realpath(folder))  # one key for every spelling of the folder
    made = not folder.exists()
    if folder in _held:
        fd, depth = _held[folder]
        _held[folder] = (fd, depth + 1)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUse(
                f"{what} is in use by another command ({holder}); wait for it to end, or stop it and rerun "
                "(a killed command's lock is taken over)"
            ) from None
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": _command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _held[folder] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _held[folder]
        if depth > 1:
            _held[folder] = (fd, depth - 1)
        else:
            del _held[folder]
            os.ftruncate(fd, 0)  # while still locked: nobody reads a stale holder
            if made and folder.is_dir() and [p.name for p in folder.iterdir()] == [LOCK_NAME]:  # nothing written
                (folder / LOCK_NAME).unlink()
                folder.rmdir()
            os.close(fd)  # releases the lock


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv and sys.argv[0] else "python"
