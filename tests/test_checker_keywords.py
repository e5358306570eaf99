"""Argument checkers take the public function's arguments by name, each one
explicitly: a renamed parameter must break here, not switch its check off."""

import inspect

import pytest

from tftransfer import _checks, _settings, build_finetuner, data, fine_tune

CHECKERS = [
    (_checks.finetuner_arguments, [build_finetuner]),
    (_checks.fine_tune_arguments, [fine_tune]),
    (_settings.make_spec, [data.from_directory, data.from_arrays, data.from_dataset,
                           data.from_tfds]),
]


@pytest.mark.parametrize("checker,callers", CHECKERS, ids=[c[0].__name__ for c in CHECKERS])
def test_checkers_take_named_arguments_of_their_callers(checker, callers):
    checked = inspect.signature(checker).parameters
    assert not [p for p in checked.values() if p.kind is p.VAR_KEYWORD]  # no **_ swallowing
    for caller in callers:
        missing = set(checked) - set(inspect.signature(caller).parameters)
        assert missing <= {"validation_split"}, (caller.__name__, missing)  # a stream has none
        assert "locals()" not in inspect.getsource(caller), caller.__name__
