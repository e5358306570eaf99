"""Tasks: their names, how a model's task is found, and the class-name rule.

The one home of these rules: the `FineTuner` and its heads, the serving export
and `predict` import them, so every form of a model (a `FineTuner`, any Keras
model, a `.keras` file, an export) is read as the same task with the same
labels.

- `classification`: a softmax over `n >= 2` classes, labelled by one name each.
- `multi_label`: a sigmoid per label.
- `regression`: anything else (no output activation, or another one).

Example:

>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
...                           keras.layers.Softmax()])
>>> task_of(model)
'classification'
"""

from tftransfer._checks import invalid
from tftransfer._registry import Registry

TASKS = ("classification", "multi_label", "regression")

# The output activation of each task's head (None: linear).
ACTIVATIONS = {"classification": "softmax", "multi_label": "sigmoid", "regression": None}

_TASKS = Registry("task", "task", {task: task for task in TASKS})


def check_task(task):
    """Returns the canonical task name (`"Multi-Label"` -> `"multi_label"`).

    Raises:
        ValueError: `task` is not a task, with the valid names and close matches.
    """
    return _TASKS.lookup(task)


def task_of(model):
    """The task a model predicts.

    A model's own `task` (a `FineTuner`'s) comes first, then the `"task"` of
    its `tftransfer_info` dict, then its output activation: softmax (a
    `Softmax` layer, or a layer with `activation="softmax"`, also inside a
    nested head) means classification, sigmoid multi-label, anything else
    regression.

    Args:
        model: A `keras.Model`.

    Returns:
        One of `TASKS`.
    """
    task = getattr(model, "task", None) or (getattr(model, "tftransfer_info", None) or {}).get(
        "task")
    if task is not None:
        return check_task(task)
    return _task_of_activation(_output_activation(model))


def _output_activation(model):
    """The name of the activation the model's outputs leave (`"softmax"`, ...), or ""."""
    layer = model
    while getattr(layer, "layers", None):  # a nested model ends the outer one
        layer = layer.layers[-1]
    if type(layer).__name__ == "Softmax":  # keras.layers.Softmax has no `activation`
        return "softmax"
    return getattr(getattr(layer, "activation", None), "__name__", "")


def _task_of_activation(name):
    inverse = {activation: task for task, activation in ACTIVATIONS.items() if activation}
    return inverse.get(name, "regression")


def check_class_names(names, count, argument="class_names"):
    """Returns `names` as a list of `count` labels, or None for None.

    The rule every model form shares: one non-empty string without newlines
    per output (`labels.txt` holds one per line).

    Raises:
        ValueError: in the package's format, naming `argument`.
    """
    if names is None:
        return None
    listed = list(names) if not isinstance(names, (str, bytes, dict)) else None
    if listed is None or len(listed) != count or not all(
            isinstance(n, str) and n and "\n" not in n for n in listed):
        raise invalid(argument, f"a list of {count} non-empty strings without newlines, one "
                      "per output", names)
    return listed


def class_names_of(model):
    """A model's class names: its own (a `FineTuner`'s), else its
    `tftransfer_info` dict's, else None."""
    names = getattr(model, "class_names", None)
    if names is None:
        names = (getattr(model, "tftransfer_info", None) or {}).get("class_names")
    return None if names is None else list(names)


def default_class_names(count):
    """`["0", "1", ...]`: the labels of a model without class names."""
    return [str(i) for i in range(count)]
