"""Names tftransfer accepts for optimizers and dtype policies: one copy each.

Kept free of TensorFlow, so that a search config is checked without loading
it; `tftransfer.optim` and `tftransfer.model` build their tables from these.
"""

# Optimizer name -> the `keras.optimizers` class it makes.
OPTIMIZERS = {
    "adadelta": "Adadelta",
    "adafactor": "Adafactor",
    "adagrad": "Adagrad",
    "adam": "Adam",
    "adamax": "Adamax",
    "adamw": "AdamW",
    "ftrl": "Ftrl",
    "lamb": "Lamb",
    "lion": "Lion",
    "nadam": "Nadam",
    "rmsprop": "RMSprop",
    "sgd": "SGD",
}

# The `dtype_policy` values of `build_finetuner`, `FineTuner` and the search.
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
