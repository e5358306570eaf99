"""Search configs that cannot work are refused before any trial; Ctrl-C says how to resume."""

import os
import pathlib

import pytest

from tftransfer.search import runner
from tftransfer.search.__main__ import main

REFUSED = [
    ("data: {classes: [5]}\nsearch_space: {backbone: a}\n",
     "`data.classes` must be a list of at least 2 distinct digits 0..9 "
     "(a classifier needs 2 classes). Received: data.classes=[5]"),
    ("search_space: {backbone: a, head_epochs: 0, fine_tune_epochs: 0}\n",
     "`search_space.fine_tune_epochs` must be an integer > 0 when "
     "head_epochs is 0 (every trial would train for 0 epochs). "
     "Received: search_space.fine_tune_epochs=0"),
    ("search_space:\n  backbone: a\n  head_epochs: {choice: [0]}\n"
     "  fine_tune_epochs: {choice: [0]}\n",
     "`search_space.fine_tune_epochs` must be an integer > 0"),
    ("search_space:\n  backbone: a\n  dropout: 0.1\n  dropout: 0.2\n",
     "`--config` must hold each key once per mapping. 'dropout' is written "
     "on line 3 and again on line 4. Received: --config='"),
    ("search_space:\n  backbone: a\n  dropout: [0.1\n",
     "`--config` must be valid YAML (line 4, column 1: expected ',' or ']', but got '<stream end>')"),
    ("search_space:\n  backbone: a\n   dropout: 0.1\n",
     "`--config` must be valid YAML (line 3, column 11: mapping values are not allowed here)"),
    ("search_space: {backbone: a, learning_rate: 1e-3}\n",
     "`search_space.learning_rate` must be a number > 0 (YAML reads "
     "'1e-3' as a string, not a number: write 1.0e-3 or 0.001). "
     "Received: search_space.learning_rate='1e-3'"),
]


@pytest.mark.parametrize("text,message", REFUSED)
def test_config_that_cannot_work_exits_2_before_any_trial(text, message, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    trials = []
    monkeypatch.setattr(runner, "run", lambda *a, **k: trials.append(1))
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert trials == [] and os.listdir(tmp_path) == ["bad.yaml"]


def test_ctrl_c_prints_one_line_saying_how_to_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    path = pathlib.Path("c.yaml")
    path.write_text("search_space: {backbone: a}\n")
    assert main(["--config", str(path)]) == 130
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines == ["interrupted: finished trials are kept in the search directory; run the "
                     "same command again to resume the search."]
    assert "Traceback" not in captured.err + captured.out
