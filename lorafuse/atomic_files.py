"""Files written atomically (a temporary file renamed into place), and removal of the temporary files that
killed saves leave behind.

A temporary file is TEMP_PREFIX + the target's name + a random suffix, in the target's directory (a rename is
atomic only within one file system). Its writer holds an exclusive flock on it from creation to rename, and
the kernel drops that lock when the writer dies, however it dies (SIGKILL, the OOM killer). So before a save
writes into a directory it removes the temporary files there whose lock it can take: their writers are gone.
A file whose lock is held (a save running beside this one) or cannot be tested (a file system without locks)
is left alone. Without fcntl (Windows) an open file cannot be deleted, which protects a live writer's file.
"""

import os
import secrets
from typing import Callable, List, Tuple

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

#: How every temporary file lorafuse writes begins: hidden, and recognisably lorafuse's.
TEMP_PREFIX = ".lorafuse-tmp."


def _lock(fd: int, *, wait: bool) -> bool:
    """Take an exclusive flock on `fd`: True when held, False when another process holds it (wait=False) or
    the file system has no locks."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP: no locking here
        return False
    return True


def _same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


def remove_stale_temp_files(directory: str) -> List[str]:
    """Delete the temporary files in `directory` that lorafuse saves left behind when they were killed;
    returns their names."""
    removed = []
    with os.scandir(directory) as entries:
        candidates = [entry for entry in entries
                      if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False)]
    for entry in candidates:
        if fcntl is None:
            try:
                os.unlink(entry.path)  # fails while a live writer has it open
            except OSError:
                continue
            removed.append(entry.name)
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # renamed into place or removed meanwhile
            continue
        try:
            if _lock(fd, wait=False) and _same_file(fd, entry.path):
                os.unlink(entry.path)
                removed.append(entry.name)
        finally:
            os.close(fd)
    return removed


def _create_locked_temp(file: str) -> Tuple[int, str]:
    """A new temporary file beside `file`, open for writing and locked by this process: (its fd, its path)."""
    directory, name = os.path.split(file)
    while True:
        tmp = os.path.join(directory or ".", f"{TEMP_PREFIX}{name}.{secrets.token_hex(8)}")
        # Not tempfile.mkstemp: it creates the file 0600 and the rename keeps that, so a group sharing the output
        # directory could not read the adapter. Mode 0666 lets the umask decide, as for open(); O_EXCL refuses
        # an existing name (or a symlink planted under it).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        # Between os.open and the lock, another save's cleanup may have taken this file for stale and deleted
        # it: then the name no longer leads here, and a new name is drawn.
        _lock(fd, wait=True)
        if _same_file(fd, tmp):
            return fd, tmp
        os.close(fd)


def atomic_write(file: str, write: Callable[[object], None]) -> None:
    """Write `file` through a locked temporary file in the same directory, then rename it into place, so that a
    crash or interrupt leaves either the old file or the new one, never a part. The file gets the mode any
    new file gets (0666 less the umask)."""
    fd, tmp = _create_locked_temp(file)
    try:
        # The lock lives as long as this open file: released at close, after the rename.
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, file)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
