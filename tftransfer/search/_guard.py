"""Checks a search makes before it writes: lock, backbones, data fingerprint.

- `search_lock`: one search per directory (`tftransfer._lock.DirectoryLock`),
  held by the top process for the whole run; its trial workers and the
  chief/workers of `--workers` run under it.
- `check_backbones`: every backbone choice loads and takes the configured
  image size and channels, or a `ConfigError` names it and says why.
- `data_fingerprint` / `fingerprint_change`: what the data of a search
  directory was (folder listing, sizes and modification times), so that a
  rerun on other data is refused instead of resumed.
"""

import contextlib
import glob
import hashlib
import json
import os

from tftransfer._lock import LOCK_FILE, DirectoryLock, atomic_write_json, remove_temp_files
from tftransfer.search.config import ConfigError

FINGERPRINT_FILE = "data_fingerprint.json"


@contextlib.contextmanager
def search_lock(directory):
    """Holds the lock of a search directory while a top-level search runs.

    Trial workers, and the chief and workers of a `--workers` cluster, run
    under their parent's lock and take none. Under `multi_worker`, a worker
    other than the chief locks its own folder. A directory this call created
    is removed again if the run wrote nothing else in it.

    Raises:
        LockedError: Another live process searches in this directory.
        ConfigError: The directory cannot be created or written.
    """
    created = not os.path.isdir(directory)
    try:
        lock = DirectoryLock(directory, "search directory").acquire()
    except OSError as e:  # a file in the way, no permission, ...
        raise ConfigError("run.directory", f"a directory this process can create and write "
                          f"({type(e).__name__}: {e.strerror})", directory) from None
    try:
        yield lock
    finally:
        if created and os.listdir(directory) == [LOCK_FILE]:
            os.remove(lock.path)  # still held: no other process can be using it
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        lock.release()


# ------------------------------------------------------------------ backbones


def backbone_choices(space):
    """The backbone names of a validated `search_space` (one or a choice)."""
    spec = space["backbone"]
    return list(spec["choice"]) if isinstance(spec, dict) else [spec]


def check_backbones(cfg):
    """Builds each backbone choice on one image of the configured shape.

    Raises:
        ConfigError: At `search_space.backbone`, naming the backbone that
            does not load or does not take `data.image_size` x
            `data.channels` images, with the reason.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from tftransfer.finetuner import build_finetuner

    shape = (*cfg["data"]["image_size"], cfg["data"]["channels"])
    text = cfg["data"].get("kind") == "text"
    for name in backbone_choices(cfg["search_space"]):
        try:
            if text:  # strings in: no image shape (a BERT encoder needs its preprocessor)
                model = build_finetuner(name, num_classes=2,
                                        preprocessor=cfg["search_space"].get("preprocessor"))
                model.predict_on_batch(tf.constant(["a sentence"]))
                continue
            model = build_finetuner(name, num_classes=2, input_shape=shape)
            model.predict_on_batch(np.zeros((1, *shape), "float32"))
        except Exception as e:  # any reason: the trials would all fail with it
            reason = " ".join(str(e).split())[:500]
            takes = "strings (data.kind: text)" if text else (
                f"{shape[0]}x{shape[1]}x{shape[2]} images "
                "(data.image_size x data.channels; --image-size sets the size)")
            raise ConfigError(
                "search_space.backbone", f"a backbone that loads and takes {takes}", name,
                detail=f"It fails with {type(e).__name__}: {reason}") from None
        finally:
            keras.backend.clear_session()


# ---------------------------------------------------------------- fingerprint


def data_fingerprint(data_cfg):
    """What the data of a search is, to tell it from other data later.

    A folder is summarized by its absolute path, its number of files, their
    total size and a digest of every file's relative path, size and
    modification time; `digits` and `tfds:` sources are fully named by the
    config.

    Returns:
        A JSON-serializable dict.
    """
    source = data_cfg["source"]
    if source == "digits" or source.startswith("tfds:"):
        return {"source": source}
    root = os.path.abspath(source)
    digest, files, size = hashlib.sha256(), 0, 0
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}\n".encode())
            files, size = files + 1, size + stat.st_size
    return {"source": root, "files": files, "bytes": size, "digest": digest.hexdigest()}


def write_fingerprint(directory, data_cfg):
    """Writes the data fingerprint into the search directory."""
    atomic_write_json(os.path.join(directory, FINGERPRINT_FILE), data_fingerprint(data_cfg),
                      indent=1)


def fingerprint_change(directory, data_cfg):
    """How the data differs from the one the directory's search used.

    Returns:
        A sentence naming what changed, or None (same data, or a directory
        without a fingerprint).
    """
    path = os.path.join(directory, FINGERPRINT_FILE)
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    new = data_fingerprint(data_cfg)
    if old == new:
        return None
    if old.get("source") != new.get("source"):
        return f"its data was {old.get('source')!r}, this run's is {new.get('source')!r}"
    return (f"its data {new['source']!r} has changed since (then {old.get('files')} files, "
            f"{old.get('bytes')} bytes; now {new['files']} files, {new['bytes']} bytes, or "
            "other names or modification times)")


def remove_leftovers(directory):
    """Deletes the temporary files of writes a kill interrupted in a search directory.

    Reloading never reads them (KerasTuner reads `oracle.json`,
    `<tuner_id>.json` and `trial_*/trial.json` only); the search's top
    process calls this under its lock, never while another process writes.

    Returns:
        The number of files deleted.
    """
    removed = remove_temp_files(directory)
    for trial_dir in glob.glob(os.path.join(directory, "trial_*")):
        removed += remove_temp_files(trial_dir)
    return removed
