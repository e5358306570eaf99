"""Exclusive directory locks and crash-safe file writes.

`DirectoryLock` keeps two processes out of one search directory or one
`fine_tune` output directory: it takes an exclusive, non-blocking
`fcntl.flock` on `<directory>/.lock`. The kernel releases a flock when its
holder dies, however it dies (even SIGKILL), so a lock left by a dead
process is taken over by the next run without any stale-lock guessing; the
PID written in the file is only there to name the holder in the error.

`atomic_write_text` / `atomic_write_json` write a temporary file in the
target's directory, flush it to disk and rename it over the target, so a
reader (or a run resumed after a kill) sees the old file or the new one,
never half of one.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import tempfile
import time

LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"  # temporary files of atomic writes start with this
_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)


class LockedError(RuntimeError):
    """Another live process holds the directory's lock."""


class DirectoryLock:
    """An exclusive lock on a directory, held by one process at a time.

    Args:
        directory: The directory to lock (created if missing).
        what: What the directory is, for the error message. Defaults to
            `"search directory"`.

    Example:

    >>> import tempfile
    >>> with DirectoryLock(tempfile.mkdtemp()) as lock:
    ...     lock.locked
    True
    """

    def __init__(self, directory, what="search directory"):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_FILE)
        self.what = what
        self._fd = None

    @property
    def locked(self):
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self):
        """Takes the lock at once, or raises.

        Returns:
            This lock.

        Raises:
            LockedError: Another live process holds it; the message names
                the directory and that process.
        """
        if self._fd is not None:
            return self
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(self._busy_message()) from None
        self._fd = fd
        self._write_holder()
        return self

    def release(self):
        """Releases the lock (a no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale PID for the next reader
        os.close(fd)  # closing the descriptor releases the flock

    def holder(self):
        """The `{"pid", "host", "started"}` written by the holder, or `{}`."""
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def _write_holder(self):
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)
        os.fsync(self._fd)

    def _busy_message(self):
        info = self.holder()
        who = f"process {info['pid']}" if "pid" in info else "another process"
        if info.get("host"):
            who += f" on {info['host']}"
        if info.get("started"):
            who += f" (started {info['started']})"
        if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
            who += ", which has ended but left child processes that still hold the lock"
        return (f"The {self.what} {self.directory!r} is in use by {who}. Wait for it to "
                f"finish or stop it (kill {info.get('pid', '<pid>')}), or choose another "
                "directory.")

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        self.release()


def atomic_write_text(path, text):
    """Writes `text` to `path` so that the file is never seen half-written.

    The text goes to a temporary file in the same directory, is flushed to
    disk, then renamed over `path` (`os.replace` is atomic on POSIX).

    Args:
        path: The file to write.
        text: A string.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path) + ".", dir=directory)
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp makes 0600; keep the usual mode
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def atomic_write_json(path, obj, **dump_kwargs):
    """Writes `obj` as JSON to `path` with `atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, **dump_kwargs))


def remove_temp_files(directory):
    """Deletes the leftovers of atomic writes interrupted in `directory`.

    Returns:
        The number of files removed.
    """
    removed = 0
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))
                removed += 1
    return removed


def _alive(pid):
    """True unless `pid` is certainly not a running process on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, TypeError, ValueError):
        return True
    return True


def _file_mode(path):
    """The mode of the file being replaced, else 0666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_UMASK


def _fsync_directory(directory):
    """Makes a rename durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
