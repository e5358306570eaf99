"""The one resolver behind every `get(identifier)` in tftransfer.

Each kind of thing (optimizers, schedules, regularizers, heads, freezing
policies, backbones) keeps a plain table `{name: factory}`; `Registry.get`
normalises the identifier at the door and fails with the valid names and close
matches when it cannot.
"""

import difflib


def _normalise(name):
    return name.strip().lower().replace("-", "_")


def close_matches(name, candidates, n=3):
    """Returns up to `n` entries of `candidates` that look like `name`."""
    return difflib.get_close_matches(_normalise(name), list(candidates), n=n, cutoff=0.5)


def unknown_name_error(kind, argument, name, valid):
    """Builds the `ValueError` for a name that is not in a table.

    Args:
        kind: String, what is looked up, e.g. `"optimizer"`.
        argument: String, the argument the user passed it as.
        name: The name received.
        valid: Iterable of valid names.

    Returns:
        A `ValueError` naming the argument, the valid names, close matches
        and the value received.
    """
    valid = sorted(valid)
    hint = ""
    if isinstance(name, str):
        matches = close_matches(name, valid)
        if matches:
            hint = f" Did you mean {' or '.join(repr(m) for m in matches)}?"
    return ValueError(
        f"Unknown {kind} for `{argument}`.{hint} Valid names are: "
        f"{', '.join(valid)}. Received: {argument}={name!r}"
    )


class Registry:
    """A table of named factories with one forgiving lookup.

    Args:
        kind: String, what the table holds (used in error messages).
        argument: String, the public argument that takes these names.
        table: Dict mapping lower-case names to factories.
    """

    def __init__(self, kind, argument, table):
        self.kind = kind
        self.argument = argument
        self.table = {_normalise(k): v for k, v in table.items()}

    def names(self):
        """Returns the sorted valid names."""
        return sorted(self.table)

    def lookup(self, name, argument=None):
        """Returns the factory registered under `name` or raises `ValueError`
        (naming `argument`, by default the table's)."""
        if not isinstance(name, str) or _normalise(name) not in self.table:
            raise unknown_name_error(self.kind, argument or self.argument, name, self.table)
        return self.table[_normalise(name)]

    def __contains__(self, name):
        return isinstance(name, str) and _normalise(name) in self.table


def check_config_dict(identifier, argument):
    """Validates a `{"class_name": ..., "config": {...}}` identifier.

    Returns:
        `(class_name, config)`.
    """
    extra = set(identifier) - {"class_name", "config", "module", "registered_name"}
    if "class_name" not in identifier or extra:
        raise ValueError(
            f"A dict for `{argument}` must look like "
            f'{{"class_name": "<name>", "config": {{...}}}}. '
            f"Received: {argument}={identifier!r}"
        )
    config = identifier.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(
            f'The "config" of `{argument}` must be a dict. '
            f"Received: {argument}={identifier!r}"
        )
    return identifier["class_name"], dict(config)
