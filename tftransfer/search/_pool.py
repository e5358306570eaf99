"""Trial workers: processes that import TensorFlow once and run many trials.

The search process (the chief here) imports no TensorFlow. It starts one
worker (`python -m tftransfer.search._worker`), which imports TensorFlow,
loads the data and runs the search's trials in-process through KerasTuner,
like `multiprocessing`'s `maxtasksperchild`: after `run.worker_max_trials`
trials, or once its resident memory has grown by more than
`run.worker_max_rss_growth_mb` since its first trial, the worker leaves and a
fresh one continues. The search directory stays the one source of truth:
every worker reloads the tuner from it, and one worker runs at a time.

A worker that dies (killed, out of memory, a crash in native code) leaves
its trial RUNNING in the oracle, which KerasTuner retries first when the
next worker reloads the tuner; that worker fails it at once with the reason
(a `FailedTrialError` from `run_trial`), so KerasTuner records it FAILED
(`Oracle.end_trial`), and goes on with the search. The last worker writes
the report and the export.

Protocol: the chief writes commands to the worker's stdin, one JSON object a
line (`start`, `search`, `finish`; the end of
stdin ends it); the worker answers with events on a pipe
of its own (`ready`, `error`, `begin`, `end`, `recycle`, `done`,
`finished`). The worker's stdout lines (trial lines, the table) go to the
chief's `out`; its stderr to the chief's stderr, without TensorFlow's
start-up lines unless `verbose`. A worker whose chief dies exits at once.
"""

import collections
import json
import os
import selectors
import signal
import subprocess
import sys
import time

from tftransfer.search import _quiet
from tftransfer.search import config as config_lib

_DEATHS_BEFORE_A_TRIAL = 2  # workers dying before any trial, in a row, end the search


class WorkerError(RuntimeError):
    """Trial workers keep dying before they start a trial."""


class _WorkerProcess:
    """One worker process: its pipes, its events, how it ended."""

    def __init__(self, out, verbose):
        self.out, self.verbose = out, verbose
        events_fd, write_fd = os.pipe()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TFTRANSFER_WORKER_PARENT": str(os.getpid())}
        if not verbose:
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tftransfer.search._worker", str(write_fd)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(write_fd,), env=env)
        os.close(write_fd)
        self.pid = self.proc.pid
        self._events = collections.deque()
        self._stderr_tail = collections.deque(maxlen=5)
        self._selector = selectors.DefaultSelector()
        self._buffers = {}
        for fd, handler in ((self.proc.stdout.fileno(), self._on_stdout),
                            (self.proc.stderr.fileno(), self._on_stderr),
                            (events_fd, self._on_event)):
            self._selector.register(fd, selectors.EVENT_READ, handler)
            self._buffers[fd] = b""
        self._events_fd = events_fd

    def send(self, command, **kwargs):
        """Writes one command; False when the worker is gone."""
        try:
            self.proc.stdin.write((json.dumps({"cmd": command, **kwargs}) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def next_event(self):
        """The worker's next event (a dict), or None once it has ended."""
        while not self._events and self._selector.get_map():
            ready = sorted(self._selector.select(), key=lambda k: k[0].fd == self._events_fd)
            for key, _ in ready:  # output first: a worker writes it before its event
                self._read(key.fd, key.data)
        return self._events.popleft() if self._events else None

    def _read(self, fd, handler):
        data = os.read(fd, 65536)
        if not data:
            self._selector.unregister(fd)
            if fd == self._events_fd:
                os.close(fd)
            lines, self._buffers[fd] = [self._buffers[fd]] if self._buffers[fd] else [], b""
        else:
            *lines, self._buffers[fd] = (self._buffers[fd] + data).split(b"\n")
        for line in lines:
            handler(line.decode(errors="replace"))

    def _on_stdout(self, line):
        if not line.startswith("Reloading Tuner from"):
            self.out(line)

    def _on_stderr(self, line):
        if self.verbose or not _quiet.is_startup_noise(line):
            self._stderr_tail.append(line)
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def _on_event(self, line):
        self._events.append(json.loads(line))

    def close(self, kill=False):
        """Ends the worker (killing it with `kill`); returns why it ended."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.stdin.close()  # at the end of its commands, a worker exits
        except OSError:
            pass
        while self._selector.get_map():  # its last lines
            for key, _ in self._selector.select():
                self._read(key.fd, key.data)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self._reason(self.proc.wait())

    def _reason(self, code):
        if code < 0:
            name = signal.Signals(-code).name
            text = f"the trial worker (pid {self.pid}) was killed by {name}"
            if -code == signal.SIGKILL:
                text += " (out of memory, or killed)"
        else:
            text = f"the trial worker (pid {self.pid}) exited with code {code}"
        tail = [line.strip() for line in self._stderr_tail if line.strip()]
        return text + (f": {tail[-1]}" if tail else "")


class _RelayedConfigError(config_lib.ConfigError):
    """A worker's ConfigError, with its message as the worker worded it."""

    def __init__(self, message):
        ValueError.__init__(self, message)
        self.path = None


class TrialPool:
    """The chief's side: one worker at a time, replaced when it leaves or dies.

    Args:
        cfg: The validated search config.
        out: Callable printing one line.
        verbose: Keep TensorFlow's native start-up lines.

    Use as a context manager: the first worker starts (and imports
    TensorFlow) at once; leaving the block ends every worker.
    """

    def __init__(self, cfg, out=print, verbose=False):
        self.cfg, self.out, self.verbose = cfg, out, verbose
        self._worker, self._spare = None, None

    def __enter__(self):
        self._worker = self._start()
        return self

    def __exit__(self, *exc):
        for worker in (self._worker, self._spare):
            if worker is not None:
                worker.close(kill=True)
        self._worker = self._spare = None

    def _start(self):
        worker = _WorkerProcess(self.out, self.verbose)
        worker.send("start", config=self.cfg, verbose=self.verbose)
        return worker

    def _current(self):
        """The running worker; else the spare; else a new one."""
        if self._worker is None:
            self._worker, self._spare = self._spare or self._start(), None
        return self._worker

    def wait_ready(self):
        """Waits until the first worker has loaded the data.

        Raises:
            ConfigError: The data cannot be loaded.
            WorkerError: The worker died first.
        """
        event = self._worker.next_event()
        if event is None:
            raise WorkerError(f"Before loading the data, {self._worker.close()}.")
        if event["event"] == "error":
            raise config_lib.data_error(self.cfg["data"], event["message"])

    def check_backbones(self):
        """Has the first worker load each backbone choice on the data's shape.

        Raises:
            ConfigError: A backbone does not load or take the images (the
                worker's message, as `_guard.check_backbones` words it).
            WorkerError: The worker died first.
        """
        self._worker.send("check")
        event = self._worker.next_event()
        if event is None:
            raise WorkerError(f"While checking the backbones, {self._worker.close()}.")
        if event["event"] == "error":
            raise _RelayedConfigError(event["message"])

    def search(self):
        """Runs the search's missing trials, replacing workers as they leave."""
        failed, deaths = None, 0
        while True:
            worker = self._current()
            worker.send("search", failed=failed)
            ended, running = self._follow(worker)
            if ended == "done":
                return
            reason = worker.close()
            self._worker, failed = None, None
            if ended == "recycle":
                deaths = 0
            elif running is not None:
                deaths = 0
                failed = {"trial_id": running[0], "reason": reason[0].upper() + reason[1:],
                          "seconds": time.time() - running[1]}
                self.out(f"trial {running[0]}: {reason}; a new worker continues the search")
            else:
                deaths += 1
                if deaths >= _DEATHS_BEFORE_A_TRIAL:
                    raise WorkerError(f"Trial workers keep dying before a trial starts: {reason}.")

    def _follow(self, worker):
        """Follows one worker's search: `("done" | "recycle" | "died", running trial)`."""
        running = None
        while True:
            event = worker.next_event()
            kind = event and event["event"]
            if kind is None:
                return "died", running
            if kind == "begin":
                running = (event["trial_id"], time.time())
                if event["last"] and self._spare is None:
                    self._spare = self._start()  # imports TensorFlow during this trial
            elif kind == "end":
                running = None
            elif kind in ("recycle", "done"):
                return kind, running

    def finish(self):
        """Has a worker write the report and the export; returns `run`'s result."""
        for _ in range(_DEATHS_BEFORE_A_TRIAL):
            worker = self._current()
            worker.send("finish")
            event = worker.next_event()
            while event is not None and event["event"] != "finished":
                event = worker.next_event()
            if event is not None:
                worker.close()
                self._worker = None
                return event["result"]
            reason = worker.close(kill=True)
            self._worker = None
        raise WorkerError(f"The report and export could not be written: {reason}.")
