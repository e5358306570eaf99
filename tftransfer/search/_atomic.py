"""Crash-consistent KerasTuner state: every state file renamed into place.

KerasTuner writes its state in place (`open(path, "w")`): a process killed
during a write leaves an empty or half `oracle.json` and every resume dies
with `JSONDecodeError`. Here each file is written to a temporary file in the
same directory and renamed over the old one (`tftransfer._lock`), by
subclassing only:

- `Stateful.save(fname)` is where `Oracle.save()` (`oracle.json`) and
  `BaseTuner.save()` (`<tuner_id>.json`) end up. `AtomicState` overrides
  it and sits just above KerasTuner's `Stateful` in the method resolution
  order of our tuner and oracle classes (`tftransfer.search.tuners`).
- `trial.json` files are written by the oracle's `_save_trial(trial)`; that
  private hook is the only one that reaches them, so `OracleFiles`
  overrides it.

Two files are still written one after the other when a trial starts: its
`trial.json`, then `oracle.json`. A kill between the two leaves a trial file
the oracle never recorded; on reload it is dropped, and the oracle (whose
seed state is that of before the trial) creates the same trial again.

A kill mid-write leaves a `.tmp-*` file, which reloading never reads;
`_guard.remove_leftovers` deletes them when the next run starts.
"""

import json
import os

import keras_tuner as kt

from tftransfer._lock import atomic_write_text

TRIAL_FILE = "trial.json"


def _stateful_class():
    """KerasTuner's `Stateful` base (not exported), found on the public `Oracle`."""
    for cls in kt.Oracle.__mro__:
        if cls.__name__ == "Stateful" and hasattr(cls, "get_state"):
            return cls
    raise ImportError("keras_tuner.Oracle no longer derives from a `Stateful` class; "
                      "tftransfer.search needs keras-tuner 1.4.")


class AtomicState(_stateful_class()):
    """`Stateful` whose files are written to a temporary file and renamed into place."""

    def save(self, fname):
        """Writes `get_state()` as JSON to `fname` atomically; returns the JSON."""
        text = json.dumps(self.get_state())
        atomic_write_text(fname, text)
        return text


class OracleFiles:
    """Oracle mixin: atomic trial files; trials the oracle never recorded dropped."""

    def _save_trial(self, trial):
        # Private KerasTuner hook (`Oracle._save_trial`), overridden because
        # it is the only place trial files are written; the path is KerasTuner's.
        path = os.path.join(self._get_trial_dir(trial.trial_id), TRIAL_FILE)
        atomic_write_text(path, json.dumps(trial.get_state()))

    def set_state(self, state):
        """`Oracle.set_state`, without the trials `state` never started."""
        started = state.get("start_order")
        if started is not None:  # a kill between a new trial.json and oracle.json
            started = set(started)
            self.trials = {i: t for i, t in self.trials.items() if i in started}
        super().set_state(state)


class AtomicTuner(kt.Tuner, AtomicState):
    """Tuner base whose tuner file is crash-consistent.

    Give it an oracle whose classes include `OracleFiles` and `AtomicState`
    (`tftransfer.search.tuners`), so that the oracle and trial files are too.
    """
