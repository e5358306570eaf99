"""The learning-rate range test (Smith 2015; fastai's `lr_find`).

`lr_find(model, data)` trains a few hundred steps at a learning rate that
grows exponentially from `start_lr` to `end_lr`, records the smoothed loss,
stops once it diverges, puts every variable of the model and of its optimizer
back exactly as they were, and suggests a rate with fastai's "valley" rule:
the middle of the longest stretch where the loss keeps falling.

Example:

>>> model = build_finetuner("saved_models/digits_cnn.keras", num_classes=5)
>>> found = lr_find(model, (x, y), plot="lr_find.png")
>>> model = build_finetuner(..., learning_rate=found["suggestion"])
"""

import math
import os

import numpy as np
import tensorflow as tf


def lr_find(model, data, *, start_lr=1e-7, end_lr=10.0, num_steps=200, batch_size=32,
            diverge=4.0, plot="lr_find.png"):
    """Sweeps the learning rate exponentially and suggests one.

    The sweep trains the variables that are trainable now (for a new
    `FineTuner`, the head) with a fresh optimizer of the model's kind; the
    model's variables and its optimizer's are restored afterwards, bit for
    bit.

    Args:
        model: A compiled `keras.Model` (a `FineTuner` compiles itself).
        data: A tuple `(x, y)`, a batched `tf.data.Dataset` of
            `(inputs, targets)` or an `ImageData` (its train split).
        start_lr: Float > 0, the first rate. Defaults to `1e-7`.
        end_lr: Float > `start_lr`, the last rate. Defaults to `10.0`.
        num_steps: Integer >= 10, the steps of the sweep (the data repeats
            as needed). Defaults to `200`.
        batch_size: Integer, the batch size of array data. Defaults to `32`.
        diverge: Float > 1: the sweep stops when the smoothed loss exceeds
            `diverge` times its minimum. Defaults to `4.0`.
        plot: Path of the loss-versus-rate PNG, or None. Defaults to
            `"lr_find.png"`.

    Returns:
        A dict: `suggestion` (float, the valley rule), `learning_rates` and
        `losses` (smoothed, one per step run) and `plot` (the path or None).
    """
    _check(start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, diverge=diverge)
    if not model.compiled:
        raise ValueError("`model` must be compiled (its loss is the one swept). Received: an "
                         "uncompiled model")
    rates = start_lr * (end_lr / start_lr) ** (np.arange(num_steps) / (num_steps - 1))
    saved = _snapshot(model)
    try:
        losses = _sweep(model, _batches(data, batch_size), rates, diverge)
    finally:
        _restore(model, saved)
    rates = [float(r) for r in rates[:len(losses)]]
    suggestion = valley(rates, losses)
    if plot is not None:
        plot = _plot(plot, rates, losses, suggestion)
    return {"suggestion": suggestion, "learning_rates": rates, "losses": losses, "plot": plot}


def _check(*, start_lr, end_lr, num_steps, diverge):
    if not (isinstance(start_lr, (int, float)) and start_lr > 0):
        raise ValueError(f"`start_lr` must be a float > 0. Received: start_lr={start_lr!r}")
    if not (isinstance(end_lr, (int, float)) and end_lr > start_lr):
        raise ValueError(f"`end_lr` must be a float > start_lr ({start_lr}). "
                         f"Received: end_lr={end_lr!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 10:
        raise ValueError(f"`num_steps` must be an integer >= 10. Received: num_steps={num_steps!r}")
    if not (isinstance(diverge, (int, float)) and diverge > 1):
        raise ValueError(f"`diverge` must be a float > 1. Received: diverge={diverge!r}")


def _state(model):
    variables = list(model.variables)
    if model.optimizer is not None:
        variables += list(model.optimizer.variables)
    return variables


def _snapshot(model):
    return [(v, np.array(v)) for v in _state(model)]


def _restore(model, saved):
    for variable, value in saved:
        variable.assign(value)


def _batches(data, batch_size):
    """An endless iterator of batches."""
    if hasattr(data, "train") and hasattr(data, "class_names"):  # ImageData
        data = data.train
    if isinstance(data, (tuple, list)) and len(data) == 2:
        data = tf.data.Dataset.from_tensor_slices(tuple(data)).shuffle(
            len(data[1]), seed=0).batch(batch_size)
    if not isinstance(data, tf.data.Dataset):
        raise ValueError("`data` must be a tuple (x, y), a batched tf.data.Dataset or an "
                         f"ImageData. Received: data of type {type(data).__name__}")
    return iter(data.repeat())


def _sweep(model, batches, rates, diverge, beta=0.98):
    """Smoothed losses (fastai's bias-corrected average), until divergence."""
    config = model.optimizer.get_config()
    optimizer = type(model.optimizer).from_config({**config, "learning_rate": float(rates[0])})
    variables = model.trainable_variables
    optimizer.build(variables)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    losses, average, best = [], 0.0, math.inf
    for i, rate in enumerate(rates):
        optimizer.learning_rate = float(rate)
        x, y = next(batches)[:2]
        loss = float(step(x, y))
        average = beta * average + (1 - beta) * loss
        smoothed = average / (1 - beta ** (i + 1))
        if not math.isfinite(smoothed):
            break
        losses.append(smoothed)
        best = min(best, smoothed)
        if i > 10 and smoothed > diverge * best:
            break
    return losses


def valley(rates, losses):
    """fastai's valley rule: the rate two thirds of the way down the longest
    decreasing run of the loss (first 10% and last 5 steps left out)."""
    lo, hi = len(losses) // 10, max(len(losses) - 5, len(losses) // 10 + 1)
    rates, losses = rates[lo:hi], losses[lo:hi]
    n = len(losses)
    run, end = [1] * n, 0
    for i in range(1, n):  # longest decreasing subsequence ending at each step
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end = i
    start = end - run[end] + 1
    third = (end - start) / 3
    return float(rates[start + int(third) + int(third / 2)])


def _plot(path, rates, losses, suggestion):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rates, losses)
    ax.axvline(suggestion, color="red", linestyle="--", label=f"valley {suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

