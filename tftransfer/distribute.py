"""Distribution: strategies from identifiers, and KerasTuner's chief/workers.

`get_strategy("auto")` takes `MirroredStrategy` over all GPUs when there are
several, else the default strategy; `"mirrored"` mirrors over the GPUs (or,
with none, over the logical CPUs when several were configured, as TensorFlow's
own tests do), `"multi_worker"` is `MultiWorkerMirroredStrategy` from
`TF_CONFIG`, `"one_device"` and `"none"` are explicit; a
`tf.distribute.Strategy` instance passes through.

`launch_tuning_cluster(command, workers=N)` runs a KerasTuner chief and N
workers of `command` on this host (one GPU per worker when there are GPUs).
"""

import contextlib
import os
import socket
import subprocess
import warnings

import tensorflow as tf

from tftransfer._registry import Registry


def _auto():
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _mirrored():
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if not gpus and len(cpus) > 1:
        # CPU replicas reduce through one device: no collective ops.
        return tf.distribute.MirroredStrategy(
            [d.name for d in cpus], cross_device_ops=tf.distribute.ReductionToOneDevice())
    return tf.distribute.MirroredStrategy()


def _multi_worker():
    warnings.warn(
        "Keras 3's `fit` does not yet run under MultiWorkerMirroredStrategy "
        "(keras-team/keras#20585: it fails while reducing per-replica values); "
        "the strategy is created from TF_CONFIG for custom training loops, and "
        "for one machine use 'mirrored'.",
        stacklevel=3,
    )
    return tf.distribute.MultiWorkerMirroredStrategy()


def _one_device():
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


_STRATEGIES = Registry(
    "strategy",
    "strategy",
    {
        "auto": _auto,
        "none": tf.distribute.get_strategy,
        "mirrored": _mirrored,
        "multi_worker": _multi_worker,
        "one_device": _one_device,
    },
)


def strategy_names():
    """Returns the strategy names `get_strategy` accepts."""
    return _STRATEGIES.names()


_CREATED = {}


def get_strategy(identifier=None):
    """Returns a `tf.distribute.Strategy` (the default one for None / "none").

    A named strategy is created once per process and reused: several mirrored
    strategies in one process would clash in their collective-op keys (a
    search builds one model per trial).
    """
    if identifier is None:
        return tf.distribute.get_strategy()
    if isinstance(identifier, tf.distribute.Strategy):
        return identifier
    make = _STRATEGIES.lookup(identifier)
    name = identifier.strip().lower()
    if name not in _CREATED:
        _CREATED[name] = make()
    return _CREATED[name]


def scope(identifier=None):
    """A context manager: the strategy's scope, or nothing for the default."""
    strategy = get_strategy(identifier)
    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return contextlib.nullcontext(strategy)
    return strategy.scope()


def free_port():
    """Returns a TCP port on the loopback interface that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tuner_env(tuner_id, ip, port, gpu=None):
    """The environment KerasTuner reads to join a distributed search.

    Args:
        tuner_id: `"chief"` (serves the oracle) or `"tuner0"`, `"tuner1"`, ...
        ip: String, the chief's address.
        port: Integer, the chief's oracle port.
        gpu: Optional GPU index for `CUDA_VISIBLE_DEVICES` (`""` hides all).
    """
    env = {"KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": str(ip),
           "KERASTUNER_ORACLE_PORT": str(port)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def launch_tuning_cluster(command, workers, *, ip="127.0.0.1", port=None, gpus=None, env=None):
    """Runs `command` as a KerasTuner chief plus `workers` workers, on this host.

    Args:
        command: List of strings, the program each process runs (e.g.
            `[sys.executable, "-m", "tftransfer.search", "--config", "q.yaml"]`).
        workers: Integer >= 1, number of worker processes.
        ip: String, the address the chief's oracle listens on.
        port: Optional integer port; a free one by default.
        gpus: Optional list of GPU indices; worker i gets `gpus[i % len]` and
            the chief none. Defaults to the GPUs TensorFlow sees.
        env: Optional dict of more environment variables.

    Returns:
        0 when the chief and every worker succeeded, else the first non-zero
        exit code.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1. Received: workers={workers!r}")
    port = port or free_port()
    if gpus is None:
        gpus = list(range(len(tf.config.list_physical_devices("GPU"))))
    base = {**os.environ, **(env or {})}
    chief = subprocess.Popen(command, env={**base, **tuner_env("chief", ip, port, "" if gpus else None)})
    procs = [subprocess.Popen(command, env={**base, **tuner_env(
        f"tuner{i}", ip, port, gpus[i % len(gpus)] if gpus else None)}) for i in range(workers)]
    codes = [p.wait() for p in procs] + [chief.wait()]
    return next((c for c in codes if c), 0)

