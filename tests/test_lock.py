"""tftransfer._lock: one process per directory, dead holders taken over, atomic writes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT

from tftransfer._lock import (
    LOCK_FILE,
    DirectoryLock,
    LockedError,
    atomic_write_json,
    atomic_write_text,
    remove_temp_files,
)

# The holder loads _lock.py by path: no TensorFlow import, so it starts in well under a second.
_HOLDER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("_lock", sys.argv[1])
    lock_lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock_lib)
    lock = lock_lib.DirectoryLock(sys.argv[2]).acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills this process)
    lock.release()
    print("released", flush=True)
""")


def _holder(directory):
    """A process holding the lock on `directory`, once it has said so."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ROOT / "tftransfer" / "_lock.py"),
                             str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_second_process_refused_at_once_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LockedError) as err:
            DirectoryLock(tmp_path).acquire()
        message = str(err.value)
        assert f"process {proc.pid}" in message
        assert repr(str(tmp_path)) in message
        assert f"kill {proc.pid}" in message
        assert isinstance(err.value, RuntimeError)
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    assert proc.stdout.read() == "released\n"
    with DirectoryLock(tmp_path) as lock:  # released: free again
        assert lock.holder()["pid"] == os.getpid()


def test_lock_of_a_sigkilled_holder_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    with pytest.raises(LockedError):
        DirectoryLock(tmp_path).acquire()
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    stale = json.loads((tmp_path / LOCK_FILE).read_text())
    assert stale["pid"] == proc.pid  # the dead process's PID is still in the file
    lock = DirectoryLock(tmp_path).acquire()
    try:
        assert lock.holder()["pid"] == os.getpid()
    finally:
        lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_two_locks_in_one_process_also_exclude_each_other(tmp_path):
    with DirectoryLock(tmp_path / "new", what="output directory"):
        with pytest.raises(LockedError, match=r"^The output directory .* is in use by process "):
            DirectoryLock(tmp_path / "new", what="output directory").acquire()
    DirectoryLock(tmp_path / "new").acquire().release()


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1, 2]}
    assert os.listdir(tmp_path) == ["state.json"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, '{"ok": true}')
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, '{"bad": "\udc80"}')  # fails mid-write
    assert path.read_text() == '{"ok": true}'
    assert os.listdir(tmp_path) == ["state.json"]


def test_leftover_temp_files_are_removed(tmp_path):
    (tmp_path / ".tmp-oracle.json.x1").write_text("{")
    (tmp_path / "oracle.json").write_text("{}")
    assert remove_temp_files(tmp_path) == 1
    assert os.listdir(tmp_path) == ["oracle.json"]


_FORKING_HOLDER = _HOLDER.replace('print("locked", flush=True)', """import os
if os.fork() == 0:  # a child inherits the locked descriptor and outlives its parent
    sys.stdin.read()
    os._exit(0)
print("locked", flush=True)""")


def test_child_process_left_by_a_killed_holder_keeps_the_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _FORKING_HOLDER,
                             str(ROOT / "tftransfer" / "_lock.py"), str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    proc.kill()
    proc.wait(timeout=30)
    with pytest.raises(LockedError, match=rf"process {proc.pid} .*which has ended but left child "
                                          "processes that still hold the lock"):
        DirectoryLock(tmp_path).acquire()
    proc.stdin.close()  # the child reads EOF and exits: the lock is free
    deadline = time.monotonic() + 60
    while True:
        try:
            DirectoryLock(tmp_path).acquire().release()
            break
        except LockedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
