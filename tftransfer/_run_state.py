"""The resumable state of a `fine_tune` run in its `output_dir`.

`RunState` records what the run has finished (stage 1's history and weights,
then the final model), holds the directory's lock while the run lasts, and
refuses to resume a run made with other data or settings (`fingerprint`).
The CSV log's rows are read back (`stage2_rows`) and dropped (`drop_rows`)
here too, since they are part of what a restart resumes.
"""

import csv
import json
import os
import shutil

from tftransfer import _lock

STATE_FILE = "fine_tune_state.json"
STAGE1_WEIGHTS = "stage1.weights.h5"
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"


def fingerprint(data_digest, settings):
    """What a rerun in the same `output_dir` must share to resume it.

    Args:
        data_digest: String, `TrainData.fingerprint()`.
        settings: Dict of named settings; values that are not plain JSON
            are kept by their `repr`.
    """
    plain = {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else repr(v))
             for k, v in settings.items()}
    return {"data": data_digest, "settings": json.loads(json.dumps(plain, default=str))}


class RunState:
    """What a run in `output_dir` has finished, so a restart resumes it.

    Used as a context manager, it holds the directory's lock: a second
    process on the same `output_dir` is refused at once. Without a
    directory every method does nothing.
    """

    def __init__(self, directory, overwrite, fingerprint=None):
        self.directory = os.fspath(directory) if directory else None
        self.data, self.fingerprint, self._lock = {}, fingerprint, None
        if not self.directory:
            return
        os.makedirs(self.directory, exist_ok=True)
        self._lock = _lock.DirectoryLock(self.directory, what="fine_tune output_dir")
        self._lock.acquire()
        try:
            self._load(overwrite)
        except BaseException:
            self._lock.release()
            raise

    def _load(self, overwrite):
        if os.path.exists(self.path(STATE_FILE)):
            with open(self.path(STATE_FILE)) as f:
                self.data = json.load(f)
        if overwrite and self.data:
            self._clear()
        elif self.data.get("done"):
            raise FileExistsError(
                f"`output_dir` {self.directory!r} holds a finished fine_tune run; pass "
                "overwrite=True to replace it, or choose another output_dir."
            )
        elif self.data and self.fingerprint and self.data.get("fingerprint") != self.fingerprint:
            raise self._mismatch()
        if self.directory and self.fingerprint:
            self._write(fingerprint=self.fingerprint)

    def _mismatch(self):
        old = self.data.get("fingerprint") or {}
        changed = [k for k, v in self.fingerprint["settings"].items()
                   if old.get("settings", {}).get(k) != v]
        if old.get("data") != self.fingerprint["data"]:
            changed.insert(0, "the training data")
        return ValueError(
            f"`output_dir` {self.directory!r} holds an unfinished fine_tune run with other "
            f"data or settings (changed: {', '.join(changed) or 'unknown'}); resuming it "
            "would mix both. Pass overwrite=True to start over, or choose another "
            f"output_dir. Received: output_dir={self.directory!r}"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.release()

    def _clear(self):
        for name in (STATE_FILE, STAGE1_WEIGHTS, MODEL_FILE, HISTORY_FILE, "backup",
                     "feature_cache", "logs"):
            path = self.path(name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        self.data = {}

    def path(self, *parts):
        """A path inside the run's directory, or None without one."""
        return os.path.join(self.directory, *parts) if self.directory else None

    @property
    def stage1_done(self):
        return "stage1_history" in self.data

    @property
    def stage1_history(self):
        return self.data["stage1_history"]

    def finish_stage1(self, model, history):
        """Keeps stage 1's weights and history: a restart goes on with stage 2."""
        if self.directory:
            model.save_weights(self.path(STAGE1_WEIGHTS))
            self._write(stage1_history=plain(history))

    def finish(self, model, history):
        """Saves `model.keras` (the final, restored-best weights), then marks the run done."""
        if not self.directory:
            return
        tmp = self.path(f".{MODEL_FILE}.{os.getpid()}.tmp.keras")
        model.save(tmp)
        os.replace(tmp, self.path(MODEL_FILE))
        self.data.pop("failed", None)
        self._write(done=True, history=plain(history.history), stages=history.stages)

    def fail(self, stage, start_epoch):
        """Marks the run failed in `stage`: a rerun starts that stage again."""
        if not self.directory:
            return
        shutil.rmtree(self.path("backup", stage), ignore_errors=True)
        drop_rows(self.path(HISTORY_FILE), start_epoch)
        if stage == "stage1":
            self.data.pop("stage1_history", None)
        self._write(failed={"stage": stage, "epoch": start_epoch}, done=False)

    def _write(self, **values):
        self.data.update(values)
        _lock.atomic_write_json(self.path(STATE_FILE), self.data)


def stage2_rows(path, start):
    """Reads the stage-2 epochs (the last row of each epoch) from the CSV log."""
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows[int(row.pop("epoch"))] = row
    epochs = sorted(e for e in rows if e >= start)
    keys = list(rows[epochs[0]]) if epochs else []
    return {k: [float(rows[e][k]) for e in epochs] for k in keys}


def drop_rows(path, start):
    """Removes the epochs from `start` on from the CSV log."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < start]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)


def plain(history):
    """A history dict as JSON-able floats."""
    return {k: [float(v) for v in values] for k, values in history.items()}
