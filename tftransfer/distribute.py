"""Distribution: strategies from identifiers, and KerasTuner's chief/workers.

`get_strategy("auto")` takes `MirroredStrategy` over all GPUs when there are
several, else the default strategy; `"mirrored"` mirrors over the GPUs (or,
with none, over the logical CPUs when several were configured, as TensorFlow's
own tests do), `"multi_worker"` is `MultiWorkerMirroredStrategy` from
`TF_CONFIG`, `"one_device"` and `"none"` are explicit; a
`tf.distribute.Strategy` instance passes through.

Keras 3's `fit` / `evaluate` fail across several workers
(keras-team/keras#20585): its first-batch build reduces the distributed batch,
and the metrics of a step are reduced along an axis they do not have.
`MultiWorkerSteps`, a `keras.Model` mixin of `FineTuner` and its head model,
fixes both, and changes nothing outside multi-worker training.

`launch_tuning_cluster(command, workers=N)` runs a KerasTuner chief and N
workers of `command` on this host (one GPU per worker when there are GPUs).
"""

import contextlib
import json
import os
import socket
import subprocess

import tensorflow as tf
from keras import tree

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


def in_multi_worker_mode(strategy=None):
    """Whether `strategy` (default: the current one) spans several workers.

    Read from the strategy's public `cluster_resolver`: the cluster has more
    than one worker (chief included).
    """
    strategy = strategy or tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = strategy.cluster_resolver
    jobs = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return len(jobs.get("worker", ())) + len(jobs.get("chief", ())) > 1


def worker_task():
    """Returns `(task_type, task_index, is_chief)` from `TF_CONFIG`.

    Without `TF_CONFIG` this process is the only worker: `(None, 0, True)`.
    The chief is the `"chief"` task, or worker 0 when the cluster has none.
    """
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    kind, index = task.get("type"), int(task.get("index", 0))
    if kind is None:
        return None, 0, True
    has_chief = bool(config.get("cluster", {}).get("chief"))
    return kind, index, kind == "chief" or (kind == "worker" and index == 0 and not has_chief)


def worker_directory(directory, strategy=None):
    """Where this worker writes: `directory` itself on the chief.

    Under multi-worker training every worker runs the same program, and only
    the chief may write the user's files; the others keep their own state
    (backups, so that a restarted cluster resumes in step) in
    `directory/workers/<task_type>-<index>`.
    """
    if directory is None or not in_multi_worker_mode(strategy):
        return directory
    kind, index, chief = worker_task()
    return directory if chief else os.path.join(directory, "workers", f"{kind}-{index}")


class MultiWorkerSteps:
    """`keras.Model` mixin: Keras 3's `fit` and `evaluate` across several workers.

    Under a multi-worker `MultiWorkerMirroredStrategy`, Keras 3.15 fails in
    two places (keras-team/keras#20585): the model's first-batch build
    reduces a distributed batch across workers, and each step's metrics
    (scalars) are reduced "along axis 0". This builds from the worker's local
    batch, and gives each metric a leading axis of one so that the
    cross-worker mean lands on the value itself. Outside multi-worker mode it
    changes nothing.

    Put it before `keras.Model` in a model class's bases (`FineTuner` does).
    """

    def train_step(self, data):
        """Keras's `train_step`; each log value gets a leading axis across workers."""
        return self._with_worker_axis(super().train_step(data))

    def test_step(self, data):
        """Keras's `test_step`; each log value gets a leading axis across workers."""
        return self._with_worker_axis(super().test_step(data))

    def _with_worker_axis(self, logs):
        if not in_multi_worker_mode(self.distribute_strategy):
            return logs
        return tree.map_structure(lambda v: tf.expand_dims(v, 0), logs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Private Keras hook (TensorFlowTrainer._maybe_symbolic_build),
        # overridden because Keras offers no public way to build the compiled
        # metrics and loss from a local batch before `fit` runs its first
        # step; Keras's version reduces the distributed batch across workers
        # (docs/private_hooks.md).
        strategy = self.distribute_strategy
        if not in_multi_worker_mode(strategy):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tree.map_structure(_local_value(strategy), next(batches))
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)  # private too: same reason


def _local_value(strategy):
    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value
    return local


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

