"""The fine-tuning optimizers: each optimizer of the table with layer-wise
learning rates and a saved weight-decay exclusion list.

Every class is defined and registered (`keras.saving.register_keras_serializable`)
when tftransfer is imported, so `keras.models.load_model` finds
`tftransfer>FineTuneAdam` & co. in a new process after `import tftransfer`.
`tftransfer.optim.make_optimizer` picks them; users rarely name them.
"""

import re
import warnings

import keras

# Variables that decoupled weight decay leaves alone.
NO_DECAY = ["bias", "gamma", "beta", "moving_mean", "moving_variance"]


class FineTuneOptimizer:
    """Mixin for Keras optimizers: per-variable learning-rate multipliers and
    a weight-decay exclusion list, both kept in `get_config`, so a model saved
    after layer-wise fine-tuning reloads (default `safe_mode`) and trains on
    with the same rates.

    Multipliers are keyed by `"<layer name>/<variable name>"`, which a saved
    model keeps (variable paths may not survive a reload). A `FineTuner` binds
    the keys to its variables when it compiles (`bind_variables`); an unbound
    optimizer matches them against the ends of the variable paths.

    Args:
        lr_multipliers: Optional dict `{"<layer>/<variable>": factor}`; that
            variable is updated at `learning_rate * factor`.
        no_decay: Optional list of variable-name substrings that decoupled
            weight decay leaves alone.
    """

    def __init__(self, *args, lr_multipliers=None, no_decay=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        self.no_decay = list(no_decay or [])
        self._by_path = None
        if self.no_decay:
            self.exclude_from_weight_decay(var_names=self.no_decay)

    @property
    def multipliers_by_path(self):
        """`{variable path: factor}` once bound or built, else None."""
        return None if self._by_path is None else dict(self._by_path)

    def bind_variables(self, variables_by_key):
        """Binds the multipliers to variables: `{"<layer>/<variable>": Variable}`."""
        self._by_path, bound = {}, 0
        for key, factor in self.lr_multipliers.items():
            if key in variables_by_key:
                self._by_path.update(dict.fromkeys(_paths(variables_by_key[key]), factor))
                bound += 1
        self._warn_unbound(bound)

    def build(self, variables):
        if self._by_path is None:
            self._by_path, bound = {}, set()
            for v in variables:
                for key, factor in self.lr_multipliers.items():
                    if v.path == key or v.path.endswith("/" + key):
                        self._by_path.update(dict.fromkeys(_paths(v), factor))
                        bound.add(key)
            self._warn_unbound(len(bound))
        super().build(variables)

    def _warn_unbound(self, bound):
        missing = len(self.lr_multipliers) - bound
        if missing > 0:
            warnings.warn(
                f"{missing} of {len(self.lr_multipliers)} layer-wise learning rates name no "
                f"variable of the model (e.g. {sorted(self.lr_multipliers)[0]!r}); those "
                "variables train at the base rate.", stacklevel=3)

    def update_step(self, gradient, variable, learning_rate):
        factor = (self._by_path or {}).get(_path_of(variable))
        if factor is not None:
            learning_rate = learning_rate * factor
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "lr_multipliers": dict(self.lr_multipliers),
                "no_decay": list(self.no_decay)}


def _paths(variable):
    """The names `update_step` may see for a Keras variable: its path, and the
    name of the TF variable it wraps (a `HubLayer`'s keep their SavedModel names)."""
    return {variable.path, _path_of(variable.value)}


def _path_of(variable):
    """The Keras path of a variable, also for the backend variable Keras hands
    to `update_step` (named `<path>:0`, or `<path>/replica_<i>:0` on other
    replicas of a mirrored strategy)."""
    path = getattr(variable, "path", None)
    if path is not None:
        return path
    return re.sub(r"(/replica_\d+)?:\d+$", "", variable.name)


_register = keras.saving.register_keras_serializable(package="tftransfer")



@_register
class FineTuneAdadelta(FineTuneOptimizer, keras.optimizers.Adadelta):
    """`keras.optimizers.Adadelta` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneAdafactor(FineTuneOptimizer, keras.optimizers.Adafactor):
    """`keras.optimizers.Adafactor` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneAdagrad(FineTuneOptimizer, keras.optimizers.Adagrad):
    """`keras.optimizers.Adagrad` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneAdam(FineTuneOptimizer, keras.optimizers.Adam):
    """`keras.optimizers.Adam` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneAdamax(FineTuneOptimizer, keras.optimizers.Adamax):
    """`keras.optimizers.Adamax` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneAdamW(FineTuneOptimizer, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneFtrl(FineTuneOptimizer, keras.optimizers.Ftrl):
    """`keras.optimizers.Ftrl` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneLamb(FineTuneOptimizer, keras.optimizers.Lamb):
    """`keras.optimizers.Lamb` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneLion(FineTuneOptimizer, keras.optimizers.Lion):
    """`keras.optimizers.Lion` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneNadam(FineTuneOptimizer, keras.optimizers.Nadam):
    """`keras.optimizers.Nadam` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneRMSprop(FineTuneOptimizer, keras.optimizers.RMSprop):
    """`keras.optimizers.RMSprop` with layer-wise rates and a saved no-decay list."""


@_register
class FineTuneSGD(FineTuneOptimizer, keras.optimizers.SGD):
    """`keras.optimizers.SGD` with layer-wise rates and a saved no-decay list."""


# Optimizer class -> its fine-tuning class.
_FINE_TUNE = {cls.__mro__[2]: cls for cls in FineTuneOptimizer.__subclasses__()}


def fine_tune_class(cls):
    """The `FineTuneOptimizer` subclass of the optimizer class `cls`.

    Raises:
        ValueError: `cls` is not an optimizer of the table.
    """
    if cls not in _FINE_TUNE:
        names = ", ".join(sorted(c.__name__ for c in _FINE_TUNE))
        raise ValueError(
            "Layer-wise learning rates and `weight_decay` need an optimizer of the table "
            f"({names}). Received: optimizer={cls.__name__}")
    return _FINE_TUNE[cls]


def base_class(cls):
    """The plain Keras optimizer class of `cls` (itself unless a fine-tuning class)."""
    return cls.__mro__[2] if issubclass(cls, FineTuneOptimizer) else cls
