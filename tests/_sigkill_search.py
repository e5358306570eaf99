"""Runs a search, SIGKILLs it at seeded random moments and resumes it each time.

Usage: python tests/_sigkill_search.py CONFIG WORKDIR KILLS SEED

Imports TensorFlow once, then forks one child per run (no TensorFlow op
runs in this process before forking). Each child prints `started` and runs
`python -m tftransfer.search --config CONFIG --directory DIR` in-process.

1. A reference child searches WORKDIR/reference uninterrupted; the times of
   its lines give the run's milestones: start, each `trial N | ...` line,
   exit.
2. KILLS moments are drawn (seeded, one in each of KILLS equal slices of
   the reference run's length, so every phase longer than two slices gets
   one). A moment in the segment after milestone k is aimed at the same
   offset into that segment: the harness waits until trial k-1 has
   completed (its line in this child's output, or already on disk at the
   child's start), then waits the offset and kills the child with SIGKILL.
   The search therefore always moves forward, and kills land in start-up,
   training, trial ends, the report and the export alike. A child that
   ends before its kill (the machine got faster than in the reference run)
   is rerun with half the offset, until the kill lands.
3. After the last kill a child resumes WORKDIR/killed to the end.

Prints one JSON line: reference and final exit codes, the kills that
landed, and per kill the segment and offset.
"""

import json
import os
import random
import select
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tftransfer.search.__main__ import main  # noqa: E402

CHILD_TIMEOUT = 600  # seconds; generous for a loaded machine


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
        os.kill(self.pid, signal.SIGKILL)
        self.wait_exit(CHILD_TIMEOUT)

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


def _is_trial_line(line):
    return line.startswith("trial ") and " | " in line


def _completed_on_disk(directory):
    done = 0
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        path = os.path.join(directory, name, "trial.json")
        if name.startswith("trial_") and os.path.exists(path):
            with open(path) as f:
                done += json.load(f)["status"] == "COMPLETED"
    return done


def reference(config, directory):
    """Runs the search uninterrupted; returns (exit code, milestone times)."""
    child = Child(config, directory)
    child.wait_exit(CHILD_TIMEOUT)
    ends = [t for t, line in child.lines if _is_trial_line(line)]
    return child.code, [0.0, *ends, time.monotonic() - child.start]


def kill_run(config, directory, milestones, kills, seed):
    """Kills the search at `kills` seeded moments; returns the kill records."""
    rng = random.Random(seed)
    width = milestones[-1] / kills
    moments = [(i + rng.random()) * width for i in range(kills)]
    records = []
    for moment in moments:
        segment = max(k for k, t in enumerate(milestones[:-1]) if t <= moment)
        offset = moment - milestones[segment]
        for attempt in range(12):  # a kill aimed past the child's end: half the offset
            child = Child(config, directory)
            child.wait_line(lambda line: line == "started")
            if _completed_on_disk(directory) < segment:  # wait for trial segment-1's end
                child.wait_line(lambda line, k=segment: _is_trial_line(line)
                                and _completed_on_disk(directory) >= k)
            if not child.wait_exit(offset / 2 ** attempt):
                child.kill()
                records.append({"segment": segment, "offset": round(offset, 2),
                                "attempt": attempt})
                break
    return records


def run(config, workdir, kills, seed):
    ref_code, milestones = reference(config, os.path.join(workdir, "reference"))
    killed_dir = os.path.join(workdir, "killed")
    records = kill_run(config, killed_dir, milestones, kills, seed)
    final = Child(config, killed_dir)
    final.wait_exit(CHILD_TIMEOUT)
    return {"reference_code": ref_code, "milestones": [round(t, 2) for t in milestones],
            "kills": records, "final_code": final.code,
            "final_lines": [line for _, line in final.lines]}


if __name__ == "__main__":
    config_path, work, n_kills, rng_seed = sys.argv[1:5]
    print(json.dumps(run(config_path, work, int(n_kills), int(rng_seed))), flush=True)
