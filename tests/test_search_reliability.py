"""Search reliability: SIGKILL at 20 moments, concurrent runs, bad backbones, other data."""

import json
import os
import pathlib
import subprocess
import sys
import time

import keras
import keras_tuner as kt
import pytest
import yaml
from conftest import ROOT, SAVED

from tftransfer._lock import DirectoryLock
from tftransfer.search.__main__ import main, overrides, parser
from tftransfer.search._atomic import AtomicTuner
from tftransfer.search.tuners import RandomSearchOracle

DIGITS = str(SAVED / "digits_cnn.keras")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
TIMEOUT = 900  # seconds, for a loaded machine


def _tiny(directory="search", **data):
    """3 trials of 1+1 epochs on 25 digits, trials in-process."""
    return {
        "data": {"source": "digits", "per_class": 5, "validation_split": 0.2, **data},
        "search_space": {"backbone": DIGITS, "learning_rate": {"choice": [0.003, 0.01]},
                         "dropout": {"min": 0.0, "max": 0.5}, "batch_size": 16,
                         "head_epochs": 1, "fine_tune_epochs": 1},
        "tuner": {"kind": "random", "max_trials": 3, "seed": 1},
        "run": {"directory": str(directory), "isolate_trials": False},
    }


def _write(path, cfg):
    pathlib.Path(path).write_text(yaml.safe_dump(cfg))
    return str(path)


def _trials(directory):
    """`{trial_id: (status, score)}` from the trial files of a search directory."""
    out = {}
    for path in sorted(pathlib.Path(directory).glob("trial_*/trial.json")):
        state = json.loads(path.read_text())
        out[state["trial_id"]] = (state["status"], state["score"])
    return out


def _snapshot(directory):
    return {str(p): p.stat().st_mtime_ns for p in pathlib.Path(directory).rglob("*")
            if p.name != ".lock"}


# ------------------------------------------------------------------ SIGKILL


@pytest.mark.slow
def test_search_survives_sigkill_at_20_random_moments(tmp_path):
    cfg = _tiny()
    del cfg["run"]["isolate_trials"]  # the default: trials in trial workers
    config = _write(tmp_path / "tiny.yaml", cfg)
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "_sigkill_search.py"), config,
                          str(tmp_path), "20", "0"], env=ENV, capture_output=True, text=True,
                         timeout=2 * TIMEOUT)  # each restart imports TensorFlow in a trial worker
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["reference_code"] == 0 and result["final_code"] == 0, result
    assert len(result["kills"]) == 20
    running = [k["running"] for k in result["kills"]]  # what each kill actually interrupted
    trials = {"trial 0", "trial 1", "trial 2"}
    assert set(running) <= trials | {"start-up", "after trial 0", "after trial 1",
                                     "after trial 2", "finish"}, running
    assert len(trials & set(running)) >= 2, running  # training interrupted in several trials

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert _trials(killed) == _trials(reference)  # same ids, statuses and scores
    assert [status for status, _ in _trials(killed).values()] == ["COMPLETED"] * 3
    oracle = json.loads((killed / "oracle.json").read_text())
    assert sorted(oracle["end_order"]) == ["0", "1", "2"]  # each ended exactly once
    assert oracle["ongoing_trials"] == {} and oracle["retry_queue"] == []
    best = [yaml.safe_load((d / "best_hyperparameters.yaml").read_text())
            for d in (reference, killed)]
    assert best[1]["score"] == best[0]["score"] and best[1]["trial_id"] == best[0]["trial_id"]
    assert (killed / "export" / "1" / "saved_model.pb").exists()
    assert not (killed / "export" / "2").exists()
    assert not [p for p in killed.rglob(".tmp-*") if "export" not in p.parts]


# --------------------------------------------------------- concurrent searches


def _wait_for_lock_holder(directory, pid, proc):
    lock = DirectoryLock(directory)
    deadline = time.monotonic() + TIMEOUT
    while lock.holder().get("pid") != pid:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.slow
def test_second_search_on_a_directory_exits_2_naming_the_first(tmp_path, capsys):
    config = _write(tmp_path / "c.yaml", _tiny(tmp_path / "search"))
    first = subprocess.Popen([sys.executable, "-m", "tftransfer.search", "--config", config],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock_holder(tmp_path / "search", first.pid, first)
        started = time.monotonic()
        assert main(["--config", config]) == 2
        refused_after = time.monotonic() - started
        err = capsys.readouterr().err
        assert f"is in use by process {first.pid}" in err and f"kill {first.pid}" in err
        assert main(["--config", config, "--workers", "1"]) == 2  # the cluster path too
        assert f"process {first.pid}" in capsys.readouterr().err
        assert main(["--config", config, "--overwrite"]) == 2  # and never deletes it
        out, err = first.communicate(timeout=TIMEOUT)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    assert refused_after < 30  # the refusal waits for nothing (no lock wait, no data)
    assert out.count("| COMPLETED |") == 3 * 2  # trial lines and table rows
    assert [s for s, _ in _trials(tmp_path / "search").values()] == ["COMPLETED"] * 3
    assert os.listdir(tmp_path / "search" / "export") == ["1"]


# ----------------------------------------------------------- bad backbones


@pytest.mark.parametrize("flags, message", [
    (["--backbone", "resnet_999"],
     "`source` is neither an existing path nor a known application name"),
    (["--backbone", "missing_backbone.keras"], "`source` names a path that does not exist"),
    (["--backbone", f"{DIGITS},missing_backbone.keras"], "missing_backbone.keras"),
    (["--image-size", "16"], "takes 16x16x3 images"),
])
def test_bad_backbone_exits_2_and_writes_nothing(flags, message, tmp_path, monkeypatch,
                                                 capsys):
    monkeypatch.chdir(tmp_path)
    config = _write("c.yaml", _tiny())
    assert main(["--config", config, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `search_space.backbone` must be a backbone "
                          "that loads and takes")
    assert message in err
    assert os.listdir(tmp_path) == ["c.yaml"]


def test_image_size_and_per_class_flags(tmp_path, monkeypatch, capsys):
    args = parser().parse_args(["--config", "c", "--image-size", "48,40", "--per-class", "7"])
    assert overrides(args) == {"data.image_size": [48, 40], "data.per_class": 7}
    assert overrides(parser().parse_args(["--config", "c", "--image-size", "48"])) == {
        "data.image_size": [48, 48]}
    monkeypatch.chdir(tmp_path)
    config = _write("c.yaml", _tiny())
    assert main(["--config", config, "--image-size", "4"]) == 2
    assert main(["--config", config, "--per-class", "0"]) == 2
    assert main(["--config", config, "--data", "images", "--per-class", "5"]) == 2
    assert "`data.per_class` must be unset unless data.source is " \
        "'digits'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["c.yaml"]


def test_search_directory_that_is_a_file_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = _write("c.yaml", _tiny())
    pathlib.Path("search").write_text("a user's file")
    assert main(["--config", config]) == 2
    assert "`run.directory` must be a directory this process can create and write " \
        "(FileExistsError: File exists). Received: run.directory='search'" \
        in capsys.readouterr().err
    assert pathlib.Path("search").read_text() == "a user's file"


# ----------------------------------------------------------------- other data


def _images(folder, x, y, labels, count):
    for label in labels:
        os.makedirs(f"{folder}/class_{label}", exist_ok=True)
        for i, image in enumerate(x[y == label][:count]):
            keras.utils.save_img(f"{folder}/class_{label}/{i}.png", image, scale=False)


def test_rerun_on_other_data_is_refused(tmp_path, monkeypatch, capsys, digits_target):
    monkeypatch.chdir(tmp_path)
    x, y = digits_target
    _images("images", x, y, (0, 1), 6)
    cfg = _tiny(validation_split=0.25, image_size=32)
    del cfg["data"]["per_class"]
    cfg["data"]["source"] = "images"
    config = _write("c.yaml", cfg)
    assert main(["--config", config, "--max-trials", "1", "--epochs", "1,0"]) == 0
    leftovers = [pathlib.Path("search/.tmp-oracle.json.k1"),  # as a kill mid-write leaves
                 pathlib.Path("search/trial_0/.tmp-trial.json.k2")]
    for path in leftovers:
        path.write_text('{"ongoing_tri')
    assert main(["--config", config, "--max-trials", "1", "--epochs", "1,0"]) == 0  # same data
    assert not any(path.exists() for path in leftovers)
    capsys.readouterr()
    before = _snapshot("search")
    _images("images", x[100:], y[100:], (1,), 6)  # other images under the same names
    assert main(["--config", config, "--max-trials", "1", "--epochs", "1,0"]) == 2
    err = capsys.readouterr().err
    assert "holds a search on other data" in err and "--overwrite" in err
    assert _snapshot("search") == before


# ----------------------------------------------- KerasTuner state files (_atomic)


def _declare(hp):
    hp.Float("x", 0.0, 1.0)
    hp.Choice("k", [1, 2, 3, 4])


class _ScoringTuner(AtomicTuner):
    """Trials that just score their values."""

    def run_trial(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        return {"score": hp["x"] * hp["k"]}


def _quick_tuner(directory, max_trials):
    """A random search with our atomic oracle and tuner files."""
    oracle = RandomSearchOracle(objective=kt.Objective("score", "max"), max_trials=max_trials,
                                seed=3)
    return _ScoringTuner(oracle, hypermodel=_declare, directory=str(directory.parent),
                               project_name=directory.name)


class _StopAfterOne(_ScoringTuner):
    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.oracle.stop()  # as a trial worker does when its share is done


def test_stopped_oracle_ends_the_search_and_a_reload_goes_on(tmp_path):
    directory = tmp_path / "s"
    oracle = RandomSearchOracle(objective=kt.Objective("score", "max"), max_trials=3, seed=3)
    tuner = _StopAfterOne(oracle, hypermodel=_declare, directory=str(tmp_path), project_name="s")
    tuner.search()  # returns after one trial: no exception leaves the loop
    assert len(tuner.oracle.trials) == 1
    tuner = _quick_tuner(directory, 3)  # the next worker reloads the search
    tuner.search()
    assert json.loads((directory / "oracle.json").read_text())["end_order"] == ["0", "1", "2"]


def test_state_files_are_replaced_never_rewritten_in_place(tmp_path):
    tuner = _quick_tuner(tmp_path / "s", 1)
    tuner.search()
    with open(tmp_path / "s" / "oracle.json") as old_oracle, \
            open(tmp_path / "s" / "trial_0" / "trial.json") as old_trial:
        tuner = _quick_tuner(tmp_path / "s", 2)
        tuner.search()  # saves oracle.json and trial files again
        # A reader (or a kill) during the writes sees the whole old file.
        assert json.load(old_oracle)["end_order"] == ["0"]
        assert json.load(old_trial)["trial_id"] == "0"
    assert json.loads((tmp_path / "s" / "oracle.json").read_text())["end_order"] == ["0", "1"]
    assert not list((tmp_path / "s").rglob(".tmp-*"))


def test_trial_file_the_oracle_never_recorded_is_created_again(tmp_path):
    """A kill between a new trial's trial.json and oracle.json: the same trial runs again."""
    uninterrupted = _quick_tuner(tmp_path / "whole", 3)
    uninterrupted.search()
    tuner = _quick_tuner(tmp_path / "killed", 2)
    tuner.search()
    orphan = json.loads((tmp_path / "killed" / "trial_1" / "trial.json").read_text())
    orphan.update(trial_id="2", status="RUNNING", score=None, metrics={"metrics": {}})
    os.makedirs(tmp_path / "killed" / "trial_2")
    (tmp_path / "killed" / "trial_2" / "trial.json").write_text(json.dumps(orphan))
    resumed = _quick_tuner(tmp_path / "killed", 3)
    assert sorted(resumed.oracle.trials) == ["0", "1"]
    resumed.search()
    assert _trials(tmp_path / "killed") == _trials(tmp_path / "whole")
    def values(tuner):  # by trial id: the oracle reloads its trials in directory order
        return [tuner.oracle.trials[i].hyperparameters.values for i in sorted(tuner.oracle.trials)]

    assert values(resumed) == values(uninterrupted)
