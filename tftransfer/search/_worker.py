"""A trial worker: `python -m tftransfer.search._worker EVENTS_FD`.

Started by `tftransfer.search._pool` (which describes the protocol). It
imports TensorFlow before its first command arrives, then loads the data,
reloads the search's tuner from the search directory and runs trials
in-process until the search is done or it must leave (its trial count or
memory growth); a chief that goes away ends it at once.
"""

import ctypes
import json
import os
import queue
import signal
import sys
import threading

from tftransfer.search import _quiet, control, runner

_PR_SET_PDEATHSIG = 1


class _ShareHooks:
    """Per-trial hooks of a trial worker: tells the chief, ends its share when due.

    The worker's share ends after `max_trials` trials, or once its resident
    memory has grown by more than `max_growth_mb` since its first trial
    ended, when the search has trials left: the oracle is then told to
    `stop()`, so `tuner.search()` returns and a fresh worker continues.
    """

    def __init__(self, send, max_trials, max_growth_mb):
        self._send, self._max_trials, self._max_growth = send, max_trials, max_growth_mb
        self._begun, self._baseline = 0, None

    def on_trial_begin(self, tuner, trial):
        self._begun += 1
        last = self._begun >= self._max_trials and tuner.more_trials_to_come()
        self._send("begin", trial_id=trial.trial_id, last=last)

    def on_trial_end(self, tuner, trial):
        rss = _rss_mb()
        self._send("end", trial_id=trial.trial_id, rss_mb=rss)
        self._baseline = rss if self._baseline is None else self._baseline
        grown = self._max_growth is not None and rss - self._baseline > self._max_growth
        if (self._begun >= self._max_trials or grown) and tuner.more_trials_to_come():
            tuner.oracle.stop()


def _rss_mb():
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _CommandLoop:
    """Runs the chief's commands, in order (`start`, `check`, `search`, `finish`)."""

    def __init__(self, events):
        self._events = events
        self.cfg = self.data = self.hypermodel = self.tuner = None

    def send(self, event, **kwargs):
        sys.stdout.flush()  # the trial's lines before its event
        self._events.write(json.dumps({"event": event, **kwargs}, default=float) + "\n")
        self._events.flush()

    def start(self, config, verbose=False):
        self.cfg = config
        try:
            self.data = runner.load_data(config)
        except ValueError as e:  # ConfigError: the chief reports it
            message = str(e.__cause__ or e)
            self.send("error", message=message)
            os._exit(3)
        self.send("ready")

    def check(self):
        """Checks that every backbone choice loads and takes the data's shape."""
        from tftransfer.search import _guard

        try:
            _guard.check_backbones(self.cfg)
        except ValueError as e:  # ConfigError: the chief reports it
            self.send("error", message=str(e))
            return
        self.send("checked")

    def search(self, failed=None):
        self._ensure_tuner()
        if failed is not None:
            self.tuner.fail_on_retry(**failed)
        runner.search(self.tuner, print)
        # A stopped oracle: this worker's share is done (the chief closes our
        # stdin, which ends us); else the search is.
        ended = any(isinstance(hook, control.SearchControl) and hook.stopped
                    for hook in self.tuner.hooks)  # run.max_time or run.stop_after: all done
        self.send("recycle" if self.tuner.oracle.stopped and not ended else "done")

    def finish(self):
        self._ensure_tuner()
        result = runner.finish(self.cfg, self.tuner, self.hypermodel, self.data, print)
        self.send("finished", result={k: result[k] for k in ("directory", "rows", "best",
                                                             "export")})

    def _ensure_tuner(self):
        if self.tuner is None:
            run = self.cfg["run"]
            hooks = _ShareHooks(self.send, run["worker_max_trials"],
                                run["worker_max_rss_growth_mb"])
            self.hypermodel, self.tuner = runner.build_tuner(self.cfg, self.data, print,
                                                             hooks=[hooks])


def _die_with_parent():
    """Exits when the chief does (Linux: a signal from the kernel; else a check)."""
    parent = int(os.environ.get("TFTRANSFER_WORKER_PARENT", "0"))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):
        pass
    if parent and os.getppid() != parent:
        os._exit(1)  # the chief ended before the signal was armed


def _read_commands(commands):
    for line in sys.stdin:
        commands.put(json.loads(line))
    os._exit(0)  # the chief closed our stdin or died: stop, even mid-trial


def main(argv):
    """Runs the worker; never returns."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the chief's to handle
    events = os.fdopen(int(argv[0]), "w")
    commands = queue.Queue()
    threading.Thread(target=_read_commands, args=(commands,), daemon=True).start()
    _quiet.import_tensorflow(verbose=True)  # warm before the first command; the chief filters
    import tftransfer.search.hypermodel  # noqa: F401  (a spare worker is ready sooner)
    import tftransfer.search.sources  # noqa: F401
    worker = _CommandLoop(events)
    while True:
        command = commands.get()
        getattr(worker, command.pop("cmd"))(**command)


if __name__ == "__main__":
    main(sys.argv[1:])
