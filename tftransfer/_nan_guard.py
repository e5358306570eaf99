"""The callback that stops a stage at the first NaN or inf loss."""

import math

import keras
import numpy as np

STAGE_NAMES = {"stage1": "stage 1 (head)", "stage2": "stage 2 (fine-tuning)"}


class NaNGuard(keras.callbacks.Callback):
    """Stops at the first NaN or inf loss and restores the last good epoch's weights."""

    def __init__(self):
        super().__init__()
        self.bad_epoch = self.bad_batch = self.bad_loss = None
        self._good, self._epoch = None, 0

    def _keep(self):
        self._good = [np.array(w) for w in self.model.weights]

    def on_train_begin(self, logs=None):
        self._keep()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.bad_epoch is None:
            self.bad_epoch, self.bad_batch, self.bad_loss = self._epoch, batch, float(loss)
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.bad_epoch is None:
            self._keep()

    def on_train_end(self, logs=None):
        if self.bad_epoch is not None:
            for variable, value in zip(self.model.weights, self._good):
                variable.assign(value)

    @property
    def tripped(self):
        """Whether a NaN or inf loss stopped the stage."""
        return self.bad_epoch is not None

    def error(self, stage):
        """The `FloatingPointError` that reports the bad loss of `stage`."""
        return FloatingPointError(
            f"The training loss became {self.bad_loss} (NaN or inf) in epoch "
            f"{self.bad_epoch + 1}, batch {self.bad_batch + 1} of {STAGE_NAMES[stage]}: the "
            "weights of the last good epoch are restored and the run is marked failed, not "
            "done (the same call retries it). Lower the learning rate (`learning_rate`, "
            "`fine_tune_learning_rate` or `lr_factor`), or check the data for extreme values."
        )
