"""Per-epoch backups of a stage that survive a kill and a full disk.

Keras's `BackupAndRestore` writes `latest.weights.h5` in place: a process
killed or a disk filled while it writes leaves a corrupt file, and every later
run fails on it. `EpochBackup` writes each epoch's weights (with the
optimizer's state) to a temporary name and renames it to
`epoch-<N>.weights.h5`, `N` being the epochs done, keeping the last two; and
`restore` loads the newest one that reads, falling back to the one before.
"""

import os
import re
import warnings

import keras
import numpy as np

_NAME = re.compile(r"^epoch-(\d+)\.weights\.h5$")
KEEP = 2


class EpochBackup(keras.callbacks.Callback):
    """Saves the model's weights and optimizer state after every epoch.

    Args:
        directory: Path of the stage's backup directory.
    """

    def __init__(self, directory):
        super().__init__()
        self.directory = os.fspath(directory)

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.directory, exist_ok=True)
        final = os.path.join(self.directory, f"epoch-{epoch + 1:05d}.weights.h5")
        tmp = os.path.join(self.directory, f".tmp-{os.getpid()}-{epoch + 1}.weights.h5")
        self.model.save_weights(tmp, overwrite=True)
        _fsync(tmp)
        os.replace(tmp, final)
        for _, old in backups(self.directory)[KEEP:]:
            os.remove(old)


def backups(directory):
    """`(epochs_done, path)` of the finished backups in `directory`, newest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, name))
             for name in os.listdir(directory) if (m := _NAME.match(name))]
    return sorted(found, reverse=True)


def restore(model, directory, start):
    """Loads the newest readable backup of `directory` into `model`.

    A backup that fails to load (truncated by a full disk, say) is skipped
    with a warning and the one before is tried; when none loads, the model
    is left as it was.

    Args:
        model: The model the stage trains, its optimizer built.
        directory: The stage's backup directory.
        start: Integer, the stage's first epoch.

    Returns:
        The epoch to resume at: the epochs done by the backup loaded, else
        `start`.
    """
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith(".tmp-"):  # a save cut short (kill, full disk)
            os.remove(os.path.join(directory, name))
    found = backups(directory)
    if not found:
        return start
    before = [np.array(v) for v in _state_variables(model)]
    for epochs_done, path in found:
        try:
            model.load_weights(path)
            return max(start, epochs_done)
        except Exception as err:  # noqa: BLE001 - any unreadable backup is skipped
            warnings.warn(f"The backup {path} cannot be read ({type(err).__name__}: "
                          f"{str(err)[:200]}); trying an older one.", stacklevel=3)
    for variable, value in zip(_state_variables(model), before):
        variable.assign(value)
    return start


def _state_variables(model):
    optimizer = model.optimizer.variables if model.optimizer is not None else []
    return list(model.weights) + list(optimizer)


def _fsync(path):
    """Flushes the file to disk, so a rename never publishes unwritten bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
