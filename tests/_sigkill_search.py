"""Runs a search, SIGKILLs it at seeded random moments and resumes it each time.

Usage: python tests/_sigkill_search.py CONFIG WORKDIR KILLS SEED

The search runs in its default mode: the search process (forked from this
one, which imports no TensorFlow) starts trial workers. Each child prints
`started`, then a line `event NAME [TRIAL]` for every event its trial
worker sends (`ready`, `begin`, `end`, `done`, `finished`), and runs
`python -m tftransfer.search --config CONFIG --directory DIR` in-process.

1. A reference child searches WORKDIR/reference uninterrupted; the times of
   its lines give the segments: start-up (until trial 0 begins), trial k
   (from its `begin` to the next one's), finish (from `done` to the exit).
2. KILLS moments are drawn (seeded, one in each of KILLS equal slices of
   the reference run's length). A moment in segment s is aimed at the same
   offset into s: a new child runs until it reaches s (the `begin` of that
   trial or a later one, or `done`), the harness waits the offset, reads the
   child's output up to that instant and SIGKILLs the search process; its
   trial workers die with it (the harness waits until they are gone). A
   child that ends before its kill is rerun with half the offset.
3. Each kill records the segment planned and the one actually running: the
   child's last event before the kill (`running`), and the trials
   completed on disk once every process of the child is gone.
4. After the last kill a child resumes WORKDIR/killed to the end.

Prints one JSON line: reference and final exit codes, the segments of the
reference run, and the kill records.
"""

import json
import os
import random
import select
import signal
import sys
import time

import psutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tftransfer.search import _pool  # noqa: E402  (imports no TensorFlow)
from tftransfer.search.__main__ import main  # noqa: E402

CHILD_TIMEOUT = 600  # seconds; generous for a loaded machine


def _print_events():
    """In a child: prints each event its trial workers send, as `event NAME [TRIAL]`."""
    next_event = _pool._WorkerProcess.next_event

    def printing(self):
        event = next_event(self)
        if event is not None:
            print(f"event {event['event']} {event.get('trial_id', '')}".rstrip(), flush=True)
        return event

    _pool._WorkerProcess.next_event = printing


class Child:
    """A forked `python -m tftransfer.search` whose output lines are timed."""

    def __init__(self, config, directory):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: run the search, never return
            os.close(read)
            os.dup2(write, 1)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            print("started", flush=True)
            _print_events()
            code = main(["--config", config, "--directory", directory])
            sys.stdout.flush()
            os._exit(code)
        os.close(write)
        self.fd, self.buffer, self.lines, self.code = read, b"", [], None
        self.start = time.monotonic()

    def wait_line(self, predicate, timeout=CHILD_TIMEOUT):
        """Reads lines until one satisfies `predicate`; False if the child ended first."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self._pop_lines():
                if predicate(line):
                    return True
            if self.code is not None or time.monotonic() > deadline:
                return False
            self._read(deadline - time.monotonic())

    def wait_exit(self, timeout):
        """Waits up to `timeout` seconds for the child to end; True if it did."""
        deadline = time.monotonic() + timeout
        while self.code is None and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
            self._pop_lines()
        return self.code is not None

    def kill(self):
        """SIGKILLs the search process; returns once it and its trial workers are gone."""
        workers = psutil.Process(self.pid).children(recursive=True)
        os.kill(self.pid, signal.SIGKILL)
        self.wait_exit(CHILD_TIMEOUT)
        _, alive = psutil.wait_procs(workers, timeout=60)  # they die with their parent
        for proc in alive:  # never seen: a worker outliving the search process
            proc.kill()
        assert not alive, f"trial workers outlived the search process: {alive}"

    def last_event(self):
        """The last `started` or `event` line read so far, reading what is there now."""
        while self.code is None and select.select([self.fd], [], [], 0)[0]:
            self._read(0)
        self._pop_lines()
        phases = [line for _, line in self.lines if line == "started" or line.startswith("event ")]
        return phases[-1] if phases else None

    def _read(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], max(0.0, min(timeout, 1.0)))
        chunk = os.read(self.fd, 65536) if ready else b""
        self.buffer += chunk
        if ready and not chunk:  # end of output: collect the exit status
            _, status = os.waitpid(self.pid, 0)
            self.code = os.waitstatus_to_exitcode(status)
            os.close(self.fd)

    def _pop_lines(self):
        *complete, self.buffer = self.buffer.split(b"\n")
        now = time.monotonic() - self.start
        lines = [(now, line.decode()) for line in complete]
        self.lines += lines
        return [text for _, text in lines]


def _completed_on_disk(directory):
    done = 0
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        path = os.path.join(directory, name, "trial.json")
        if name.startswith("trial_") and os.path.exists(path):
            with open(path) as f:
                done += json.load(f)["status"] == "COMPLETED"
    return done


def _segment_starts(child):
    """`[(segment, start time)]` of a finished reference child, and its end time."""
    starts = []
    for t, line in child.lines:
        if line == "started":
            starts.append(("start-up", t))
        elif line.startswith("event begin "):
            starts.append((f"trial {line.split()[2]}", t))
        elif line == "event done":
            starts.append(("finish", t))
    return starts, time.monotonic() - child.start


def _reached(segment, line):
    """Whether a child's output `line` shows it has reached `segment` (or a later one)."""
    if segment == "start-up":
        return line == "started"
    if line == "event done":
        return True
    if segment.startswith("trial ") and line.startswith("event begin "):
        return int(line.split()[2]) >= int(segment.split()[1])
    return False


def _running(event):
    """The segment a child's last event says was running."""
    if event is None or event in ("started", "event ready", "event checked"):
        return "start-up"
    name, *trial = event.split()[1:]
    if name == "begin":
        return f"trial {int(trial[0])}"
    if name == "end":
        return f"after trial {int(trial[0])}"
    return "finish"


def reference(config, directory):
    """Runs the search uninterrupted; returns (exit code, segment starts, end time)."""
    child = Child(config, directory)
    child.wait_exit(CHILD_TIMEOUT)
    starts, end = _segment_starts(child)
    return child.code, starts, end


def kill_run(config, directory, starts, end, kills, seed):
    """Kills the search at `kills` seeded moments; returns the kill records."""
    rng = random.Random(seed)
    width = end / kills
    moments = [(i + rng.random()) * width for i in range(kills)]
    records = []
    for moment in moments:
        segment, begun = [s for s in starts if s[1] <= moment][-1]
        offset = moment - begun
        for attempt in range(12):  # a kill aimed past the child's end: half the offset
            child = Child(config, directory)
            child.wait_line(lambda line, s=segment: _reached(s, line))
            if not child.wait_exit(offset / 2 ** attempt):
                running = _running(child.last_event())
                child.kill()
                records.append({"planned": segment, "running": running,
                                "completed": _completed_on_disk(directory),
                                "offset": round(offset, 2), "attempt": attempt})
                break
    return records


def run(config, workdir, kills, seed):
    ref_code, starts, end = reference(config, os.path.join(workdir, "reference"))
    killed_dir = os.path.join(workdir, "killed")
    records = kill_run(config, killed_dir, starts, end, kills, seed)
    final = Child(config, killed_dir)
    final.wait_exit(CHILD_TIMEOUT)
    return {"reference_code": ref_code,
            "segments": [[name, round(t, 2)] for name, t in starts] + [["end", round(end, 2)]],
            "kills": records, "final_code": final.code,
            "final_lines": [line for _, line in final.lines]}


if __name__ == "__main__":
    config_path, work, n_kills, rng_seed = sys.argv[1:5]
    print(json.dumps(run(config_path, work, int(n_kills), int(rng_seed))), flush=True)
