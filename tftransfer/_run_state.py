"""The resumable state of a `fine_tune` run in its `output_dir`.

`RunState` records what the run has finished (stage 1's history and weights,
then the final model), holds the directory's lock while the run lasts, and
refuses to resume a run made with other data or settings (`fingerprint`).
The CSV log's rows are read back (`logged_epochs`) and dropped (`drop_rows`)
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
REPLACEMENT_DIR = ".replacement"
# What a run owns in its directory, in the order a replacement publishes it.
PUBLISHED = (MODEL_FILE, STAGE1_WEIGHTS, HISTORY_FILE, "backup", "feature_cache", "logs",
             STATE_FILE)


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
        self.replaces = None  # the directory of the run this one replaces when it publishes
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
        self.data = self._read()
        if overwrite and self.data:
            self._stage_replacement()
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
        before = old.get("settings", {})
        changed = [f"{k} (was {before.get(k)!r}, now {v!r})"
                   for k, v in self.fingerprint["settings"].items() if before.get(k) != v]
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

    def _read(self):
        if not os.path.exists(self.path(STATE_FILE)):
            return {}
        with open(self.path(STATE_FILE)) as f:
            return json.load(f)

    def _stage_replacement(self):
        """Runs in `output_dir/.replacement` so that the old run stays whole until
        this one publishes (`finish`); resumes a replacement cut short with the
        same fingerprint, else starts it over."""
        self.replaces = self.directory
        self.directory = os.path.join(self.directory, REPLACEMENT_DIR)
        self.data = self._read() if os.path.isdir(self.directory) else {}
        if self.data.get("done") or self.data.get("fingerprint") != self.fingerprint:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.data = {}
        os.makedirs(self.directory, exist_ok=True)

    def _publish(self):
        """Moves a finished replacement run over the run it replaces: the model
        first, the state file (which says `done`) last."""
        for name in PUBLISHED:
            new, old = os.path.join(self.directory, name), os.path.join(self.replaces, name)
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old)
            if os.path.exists(new):
                os.replace(new, old)
            elif os.path.exists(old):
                os.remove(old)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory, self.replaces = self.replaces, None

    def path(self, *parts):
        """A path inside the run's directory, or None without one."""
        return os.path.join(self.directory, *parts) if self.directory else None

    def logged(self, start, end=None):
        """The history of epochs `[start, end)`, read from the run's CSV log."""
        return logged_epochs(self.path(HISTORY_FILE), start, end)

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
            shutil.rmtree(self.path("backup", "stage1"), ignore_errors=True)

    def finish(self, model, history):
        """Saves `model.keras` (the final, restored-best weights), marks the run
        done, and publishes it over the run it replaces (`overwrite=True`)."""
        if not self.directory:
            return
        tmp = self.path(f".{MODEL_FILE}.{os.getpid()}.tmp.keras")
        model.save(tmp)
        os.replace(tmp, self.path(MODEL_FILE))
        self.data.pop("failed", None)
        self._write(done=True, history=plain(history.history), stages=history.stages)
        shutil.rmtree(self.path("backup"), ignore_errors=True)
        if self.replaces:
            self._publish()

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


def logged_epochs(path, start, end=None):
    """The epochs `[start, end)` of the CSV log (its last row of each epoch)."""
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows[int(row.pop("epoch"))] = row
    epochs = sorted(e for e in rows if e >= start and (end is None or e < end))
    keys = list(rows[epochs[0]]) if epochs else []
    # CSVLogger writes "NA" for a metric an epoch lacks (every val_* without validation).
    return {k: [float("nan") if rows[e][k] == "NA" else float(rows[e][k]) for e in epochs]
            for k in keys if any(rows[e][k] != "NA" for e in epochs)}


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
