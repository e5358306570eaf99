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
import warnings

from tftransfer.search import _quiet, runner

_PR_SET_PDEATHSIG = 1


class _Recycle(Exception):
    """The worker has run its share of trials; a fresh one takes over."""


class _Pooled:
    """Tuner mixin: reports each trial to the chief, fails a dead worker's trial, leaves when due."""

    def _setup_pool(self, send, max_trials, max_growth_mb):
        self._send, self._max_trials, self._max_growth = send, max_trials, max_growth_mb
        self._begun, self._baseline, self._died = [], None, {}

    def fail_on_retry(self, trial_id, reason, seconds):
        """Fails trial `trial_id` when KerasTuner retries it: its worker died in it.

        Reloading a tuner sends the trials that were running to be retried
        first; this one then fails at once with `reason` (a
        `FailedTrialError`), so KerasTuner records it FAILED, prints its
        line and counts it towards `max_consecutive_failed_trials`.
        """
        self._died[trial_id] = (reason, seconds)

    def on_trial_begin(self, trial):
        self._begun.append(trial.trial_id)
        last = len(self._begun) >= self._max_trials and self._more_to_come()
        self._send("begin", trial_id=trial.trial_id, last=last)
        super().on_trial_begin(trial)
        if trial.trial_id in self._died:  # its time: the dead worker's
            self._started[trial.trial_id] -= self._died[trial.trial_id][1]

    def run_trial(self, trial, *args, **kwargs):
        if trial.trial_id in self._died:
            import keras_tuner as kt

            raise kt.errors.FailedTrialError(self._died.pop(trial.trial_id)[0])
        return super().run_trial(trial, *args, **kwargs)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        rss = _rss_mb()
        self._send("end", trial_id=trial.trial_id, rss_mb=rss)
        self._baseline = rss if self._baseline is None else self._baseline
        grown = self._max_growth is not None and rss - self._baseline > self._max_growth
        if (len(self._begun) >= self._max_trials or grown) and self._more_to_come():
            raise _Recycle()

    def _more_to_come(self):
        limit = self.oracle.max_trials
        return limit is None or len(self.oracle.trials) < limit


def _rss_mb():
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _Worker:
    """Runs the chief's commands, in order."""

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
        try:
            runner.search(self.tuner, print)
        except _Recycle:
            self.send("recycle")  # the chief closes our stdin, which ends us
            return
        self.send("done")

    def finish(self):
        self._ensure_tuner()
        directory = self.cfg["run"]["directory"]
        result = runner.finish(self.cfg, self.tuner, self.hypermodel, self.data, directory, print)
        self.send("finished", result={k: result[k] for k in ("directory", "rows", "best",
                                                             "export")})

    def _ensure_tuner(self):
        if self.tuner is None:
            run = self.cfg["run"]
            self.hypermodel, self.tuner = runner.build_tuner(self.cfg, self.data, print,
                                                             mixins=(_Pooled,))
            self.tuner._setup_pool(self.send, run["worker_max_trials"],
                                   run["worker_max_rss_growth_mb"])


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
    warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
    worker = _Worker(events)
    while True:
        command = commands.get()
        getattr(worker, command.pop("cmd"))(**command)


if __name__ == "__main__":
    main(sys.argv[1:])
