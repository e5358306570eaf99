"""Distribution strategies from identifiers.

`get_strategy("auto")` takes `MirroredStrategy` over all GPUs when there are
several (or several logical devices were configured), else the default
strategy; `"mirrored"`, `"multi_worker"` (reads `TF_CONFIG`), `"one_device"`
and `"none"` are explicit; a `tf.distribute.Strategy` instance passes through.
"""

import contextlib

import tensorflow as tf

from tftransfer._registry import Registry


def _auto():
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _one_device():
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


_STRATEGIES = Registry(
    "strategy",
    "strategy",
    {
        "auto": _auto,
        "none": tf.distribute.get_strategy,
        "mirrored": lambda: tf.distribute.MirroredStrategy(),
        "multi_worker": lambda: tf.distribute.MultiWorkerMirroredStrategy(),
        "one_device": _one_device,
    },
)


def strategy_names():
    """Returns the strategy names `get_strategy` accepts."""
    return _STRATEGIES.names()


def get_strategy(identifier=None):
    """Returns a `tf.distribute.Strategy` (the default one for None / "none")."""
    if identifier is None:
        return tf.distribute.get_strategy()
    if isinstance(identifier, tf.distribute.Strategy):
        return identifier
    return _STRATEGIES.lookup(identifier)()


def scope(identifier=None):
    """A context manager: the strategy's scope, or nothing for the default."""
    strategy = get_strategy(identifier)
    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return contextlib.nullcontext(strategy)
    return strategy.scope()
