"""The stage-2 learning rate of `fine_tune`: the rate, its warmup, its decay.

Stage 2 unfreezes a pretrained backbone under a fresh optimizer. Adam's first
steps move every weight by about the full rate whatever its gradient, which is
what collapses a freshly unfrozen backbone (see `bench/two_stage.py`). The
default recipe therefore starts low and warms up:

* rate: `fine_tune_learning_rate`, else the stage-1 rate times `lr_factor`;
* warmup: a float rate ramps up linearly over the first `fine_tune_warmup`
  epochs of stage 2 (`optim.WarmupSchedule`); a schedule given as
  `fine_tune_learning_rate` is used as it is;
* schedule dicts and names resolve through `optim.get_schedule`, like
  `build_finetuner(learning_rate=...)`; a `cosine`, `warmup_cosine` or
  `polynomial` dict without `decay_steps` decays over the steps of stage 2.

Example:

>>> rate = stage2_rate(model, None, lr_factor=0.03, warmup=2.0,
...                    steps_per_epoch=5, epochs=10)
>>> type(rate).__name__
'WarmupSchedule'
"""

import math
import warnings

import keras

from tftransfer import optim
from tftransfer._checks import check_float, invalid, is_real

_SCHEDULE = keras.optimizers.schedules.LearningRateSchedule
# Schedules whose `decay_steps` is the length of the decay: stage 2 by default.
_DECAY_OVER_STAGE = ("cosine", "warmup_cosine", "polynomial")


def check_rate(rate):
    """Checks `fine_tune_learning_rate` as `get_schedule` would resolve it.

    Returns:
        `rate` unchanged (None, a float, a schedule, a name or a dict).
    """
    if rate is None:
        return None
    checked = {"class_name": rate} if isinstance(rate, str) else rate
    if isinstance(checked, dict) and _name(checked) in _DECAY_OVER_STAGE:
        checked = _with_decay_steps(checked, 1)  # the real length is known in `stage2_rate`
    optim.get_schedule(checked, learning_rate=1e-3, argument="fine_tune_learning_rate")
    return rate


def check_warmup(warmup):
    """Checks `fine_tune_warmup`: a float >= 0, epochs of stage 2."""
    return check_float(warmup, "fine_tune_warmup", low=0.0)


# `fine_tune_ema="auto"`: the average spans this fraction of stage 2's epochs.
AUTO_EMA_FRACTION = 0.4


def check_ema(ema):
    """Checks `fine_tune_ema`: `"auto"`, None, or a float >= 0 of epochs."""
    if (isinstance(ema, str) and ema == "auto") or ema is None:
        return ema
    if not (is_real(ema) and math.isfinite(ema) and ema >= 0):
        raise invalid("fine_tune_ema", 'a finite float >= 0 (epochs), "auto" or None', ema)
    return float(ema)


def ema_momentum(ema, steps_per_epoch, epochs):
    """The per-step momentum of stage 2's weight average, or None for none.

    An exponential moving average with momentum `m` weighs the last
    `1 / (1 - m)` steps most; `ema` gives that span in epochs (`"auto"`: 40%
    of stage 2), so it means the same whatever the batch count.
    """
    span = AUTO_EMA_FRACTION * epochs if isinstance(ema, str) else ema
    if not span or not epochs:
        return None
    if not steps_per_epoch:
        warnings.warn("The number of training batches is unknown, so stage 2 runs without "
                      "its weight average (`fine_tune_ema`). Give the dataset a known "
                      "cardinality (`dataset.apply(tf.data.experimental.assert_cardinality(n))`).",
                      stacklevel=4)
        return None
    return max(0.0, 1.0 - 1.0 / (span * steps_per_epoch))


def stage2_rate(model, rate, lr_factor, warmup, steps_per_epoch, epochs):
    """The learning rate (float or schedule) of stage 2.

    Args:
        model: The `FineTuner`; its `base_learning_rate` is stage 1's.
        rate: `fine_tune_learning_rate`: None, a float, a schedule name, a
            schedule dict or a Keras schedule.
        lr_factor: Float, stage 2's rate as a fraction of stage 1's when
            `rate` is None (and the base of a dict without `learning_rate`).
        warmup: Float >= 0, epochs of linear warmup of a float rate.
        steps_per_epoch: Integer or None (unknown: no warmup, with a warning).
        epochs: Integer, the epochs of stage 2.

    Returns:
        A float or a `keras.optimizers.schedules.LearningRateSchedule`.
    """
    base = model.base_learning_rate
    if rate is None:
        rate = optim.ScaledSchedule(base, lr_factor) if isinstance(base, _SCHEDULE) \
            else base * lr_factor
    elif not isinstance(rate, (_SCHEDULE, float, int)):
        if isinstance(rate, str):
            rate = {"class_name": rate}
        if _name(rate) in _DECAY_OVER_STAGE and steps_per_epoch:
            rate = _with_decay_steps(rate, steps_per_epoch * epochs)
        rate = optim.get_schedule(rate, learning_rate=_peak(base) * lr_factor,
                                  argument="fine_tune_learning_rate")
    if isinstance(rate, _SCHEDULE) or not warmup:
        return rate
    if not steps_per_epoch:
        warnings.warn("The number of training batches is unknown, so stage 2 runs without "
                      "its `fine_tune_warmup`. Give the dataset a known cardinality "
                      "(`dataset.apply(tf.data.experimental.assert_cardinality(n))`).",
                      stacklevel=4)
        return rate
    return optim.WarmupSchedule(rate, max(1, math.ceil(warmup * steps_per_epoch)))


def _name(identifier):
    name = identifier.get("class_name") if isinstance(identifier, dict) else identifier
    return name.strip().lower() if isinstance(name, str) else name


def _with_decay_steps(identifier, steps):
    """The schedule dict with `decay_steps` set to `steps` when it has none."""
    config = dict(identifier.get("config") or {})
    if "decay_steps" not in config:
        warm = config.get("warmup_steps", 0) if _name(identifier) == "warmup_cosine" else 0
        config["decay_steps"] = max(1, int(steps) - (warm if isinstance(warm, int) else 0))
    return {**identifier, "config": config}


def _peak(schedule):
    """A schedule's starting (or peak) rate, for dicts without a `learning_rate`."""
    if not isinstance(schedule, _SCHEDULE):
        return float(schedule)
    config = schedule.get_config()
    for key in ("warmup_target", "initial_learning_rate", "learning_rate"):
        if isinstance(config.get(key), (int, float)) and config[key]:
            return float(config[key])
    return float(keras.ops.convert_to_numpy(schedule(0)))
