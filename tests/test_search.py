"""python -m tftransfer.search: config schema, CLI end to end, resume, failures, mirrored."""

import os
import pathlib
import re

import keras
import pytest
import yaml
from conftest import ROOT, SAVED

from tftransfer import build_finetuner, fine_tune
from tftransfer.search import ConfigError, load_config, validate
from tftransfer.search import config as config_lib
from tftransfer.search.__main__ import main, overrides, parser

DIGITS = str(SAVED / "digits_cnn.keras")
CONFIGS = ("quickstart", "image_folder", "tfhub", "text")


def _tiny(**changes):
    """A config for a 3-trial search of a few seconds a trial."""
    cfg = {
        "data": {"source": "digits", "per_class": 5, "validation_split": 0.2},
        "search_space": {"backbone": DIGITS,
                         "learning_rate": {"choice": [0.003, 0.01]},
                         "dropout": {"min": 0.0, "max": 0.5},
                         "batch_size": 16, "head_epochs": 1, "fine_tune_epochs": 1},
        "tuner": {"kind": "random", "max_trials": 3, "seed": 1},
        "run": {"directory": "search", "isolate_trials": False},  # in-process: fast
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return cfg


def _write(path, cfg):
    path = pathlib.Path(path)
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return str(path)


def _snapshot(directory):  # without the lock file, which every run opens
    return {str(p): p.stat().st_mtime_ns for p in pathlib.Path(directory).rglob("*")
            if p.name != ".lock"}


def _table_rows(report):
    lines = pathlib.Path(report).read_text().splitlines()
    return [line for line in lines if line.startswith("| ") and line[2].isdigit()]


# --------------------------------------------------------------------- config


@pytest.mark.parametrize("name", CONFIGS)
def test_bundled_configs_validate_and_round_trip(name):
    cfg = load_config(ROOT / "tuner_configs" / f"{name}.yaml")
    assert validate(yaml.safe_load(config_lib.dump(cfg))) == cfg


def test_former_trainable_key_is_read_as_unfreeze_with_a_warning():
    with pytest.warns(DeprecationWarning, match="`search_space.trainable` is deprecated: it is "
                      "now `search_space.unfreeze`"):
        cfg = validate(_tiny(search_space__trainable="top:2"))
    assert cfg["search_space"]["unfreeze"] == "top:2" and "trainable" not in cfg["search_space"]
    with pytest.raises(ConfigError, match="`search_space.trainable` must be absent when `unfreeze` "
                       "is given"):
        validate(_tiny(search_space__trainable="top:2", search_space__unfreeze="all"))


@pytest.mark.parametrize("role, workers, strategy, isolate, mode", [
    (None, None, "none", True, "pooled"),
    (None, None, "none", False, "in_process"),
    (None, None, "multi_worker", True, "multi_worker"),
    (None, 2, "none", True, "cluster"),
    ("chief", None, "none", True, "cluster_chief"),
    ("tuner0", None, "none", True, "cluster_worker"),
])
def test_search_mode(role, workers, strategy, isolate, mode, monkeypatch):
    from tftransfer.search.runner import search_mode

    if role is None:
        monkeypatch.delenv("KERASTUNER_TUNER_ID", raising=False)
    else:
        monkeypatch.setenv("KERASTUNER_TUNER_ID", role)
    cfg = validate(_tiny(run__strategy=strategy, run__isolate_trials=isolate))
    assert search_mode(cfg, workers).value == mode


def test_round_trip_of_every_knob_form():
    raw = _tiny(search_space__unfreeze={"int_min": 0, "int_max": 3},
                search_space__hidden_units={"choice": [[], [32, 16]]},
                search_space__layerwise_lr_decay={"min": 0.5, "max": 1.0, "step": 0.1})
    cfg = validate(raw)
    assert validate(yaml.safe_load(yaml.safe_dump(cfg))) == cfg
    assert cfg["search_space"]["learning_rate"] == {"choice": [0.003, 0.01]}
    assert cfg["data"]["image_size"] == [32, 32]


INVALID = [
    ("search_space:\n  backbone: a\n  foo: 1\n",
     "`search_space.foo` must be one of the keys backbone, preprocessor, unfreeze, optimizer, "
     "learning_rate, schedule, regularizer_kind, regularizer_strength, dropout, "
     "hidden_units, label_smoothing, batch_size, head_epochs, fine_tune_epochs, "
     "layerwise_lr_decay, lr_factor, fine_tune_warmup, fine_tune_ema. "
     "Received: search_space.foo='foo'"),
    ("search_space:\n  backbone: a\n  fine_tune_ema: always\n",
     "`search_space.fine_tune_ema` must be a number >= 0 (epochs), 'auto' or null. "
     "Received: search_space.fine_tune_ema='always'"),
    ("search_space:\n  backbone: a\n  batch_size: '32'\n",
     "`search_space.batch_size` must be an integer >= 1. "
     "Received: search_space.batch_size='32'"),
    ("search_space:\n  backbone: a\n  optimizer: {choice: []}\n",
     "`search_space.optimizer.choice` must be a non-empty list. "
     "Received: search_space.optimizer.choice=[]"),
    ("search_space:\n  backbone: a\n  optimizer: {min: 0.1, max: 0.2}\n",
     "`search_space.optimizer` must be a value or {choice: [...]}. This knob takes no "
     "{min, max} range. Received: search_space.optimizer={'min': 0.1, 'max': 0.2}"),
    ("search_space:\n  backbone: a\n  learning_rate: {min: 0.1, max: 0.001}\n",
     "`search_space.learning_rate.max` must be a number > min (0.1). "
     "Received: search_space.learning_rate.max=0.001"),
    ("search_space:\n  backbone: a\n  dropout: {min: 0.0, max: 0.5, sampling: log}\n",
     "`search_space.dropout.min` must be a number > 0 for log sampling. "
     "Received: search_space.dropout.min=0.0"),
    ("search_space:\n  backbone: a\n  dropout: {choice: [0.1], step: 2}\n",
     "`search_space.dropout.step` must be one of the keys choice. "
     "Received: search_space.dropout.step='step'"),
    ("search_space:\n  backbone: a\n  optimizer: {choice: [adam, adamm]}\n",
     "`search_space.optimizer.choice[1]` must be one of 'adadelta'"),
    ("search_space:\n  backbone: a\n  unfreeze: top:x\n",
     "`search_space.unfreeze` must be 'none', 'all', 'top:N' (N >= 0) "
     "or 'fraction:F' (0 <= F <= 1). Received: search_space.unfreeze='top:x'"),
    ("search_space:\n  dropout: 0.1\n",
     "`search_space.backbone` must be given (this key is required). "
     "Received: search_space.backbone=None"),
    ("search_space: {backbone: a}\ntuner: {kind: annealing}\n",
     "`tuner.kind` must be one of 'random', 'bayesian', 'hyperband', "
     "'grid'. Received: tuner.kind='annealing'"),
    ("search_space: {backbone: a}\nrun: {strategy: tpu}\n",
     "`run.strategy` must be one of 'none', 'auto', 'mirrored', "
     "'multi_worker', 'one_device'. Received: run.strategy='tpu'"),
    ("search_space: {backbone: a}\ndata: {source: folder, per_class: 5}\n",
     "`data.per_class` must be unset unless data.source is 'digits'. Here data.source is "
     "'folder'. Received: data.per_class=5"),
    ("- a\n", "`config` must be a mapping with the sections data, search_space, tuner, run. "
     "Received: config=['a']"),
    ("search_space: [backbone: a\n", "`--config` must be valid YAML"),
]


@pytest.mark.parametrize("text,message", INVALID)
def test_invalid_config_exits_2_with_message_and_writes_nothing(text, message, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "bad.yaml", text)
    assert main(["--config", path]) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["bad.yaml"]


def test_validate_raises_config_error():
    with pytest.raises(ConfigError, match=r"^`search_space.dropout` must be a number >= 0 and < 1\. "
                       r"Received: search_space.dropout=1.5$"):
        validate({"search_space": {"backbone": "a", "dropout": 1.5}})


def test_bad_arguments_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _write("c.yaml", _tiny())
    assert main(["--config", path, "--tuner", "annealing"]) == 2
    assert main(["--config", path, "--max-trials", "0"]) == 2
    assert main([]) == 2
    assert main(["--config", path, "--workers", "2", "--strategy", "multi_worker"]) == 2
    assert "`run.strategy` must be a one-machine strategy with --workers" \
        in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["c.yaml"]


def test_overrides_map_flags_to_config_keys():
    args = parser().parse_args(["--config", "c", "--backbone", "a,b", "--epochs", "2,1",
                                "--data", "imgs", "--tuner", "grid", "--max-trials", "4",
                                "--strategy", "mirrored", "--directory", "d"])
    assert overrides(args) == {
        "data.source": "imgs", "data.classes": None, "data.per_class": None,
        "tuner.kind": "grid", "tuner.max_trials": 4, "run.directory": "d",
        "run.strategy": "mirrored", "search_space.backbone": {"choice": ["a", "b"]},
        "search_space.head_epochs": 2, "search_space.fine_tune_epochs": 1}


# ----------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-trial search run through the CLI, in a fresh folder."""
    root = tmp_path_factory.mktemp("search")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        path = _write(root / "tiny.yaml", _tiny())
        code = main(["--config", path])
    keras.backend.clear_session()
    return root, path, code


def test_cli_end_to_end(finished, digits_target):
    root, _, code = finished
    search = root / "search"
    assert code == 0
    assert len(_table_rows(search / "report.md")) == 3
    assert len(list(search.glob("trial_*"))) == 3
    assert (search / "trials.png").stat().st_size > 0
    assert (search / "export" / "1" / "saved_model.pb").exists()
    best = yaml.safe_load((search / "best_hyperparameters.yaml").read_text())
    assert set(best) == {"trial_id", "objective", "score", "build_finetuner", "fine_tune"}
    model = build_finetuner(**best["build_finetuner"])
    x, y = digits_target
    history = fine_tune(model, (x[:40], y[:40]), (x[40:60], y[40:60]), verbose=0,
                        **best["fine_tune"])
    assert len(history.history["val_accuracy"]) >= 1
    assert load_config(search / "config.yaml") == load_config(root / "tiny.yaml")


def test_rerun_resumes_without_rerunning_trials(finished, monkeypatch, capsys):
    root, path, _ = finished
    monkeypatch.chdir(root)
    before = _snapshot(root / "search" / "trial_0")
    assert main(["--config", path]) == 0
    out = capsys.readouterr().out
    assert "trial 0 |" not in out and "unchanged" in out
    assert _snapshot(root / "search" / "trial_0") == before
    assert len(list((root / "search").glob("trial_*"))) == 3
    assert os.listdir(root / "search" / "export") == ["1"]


def test_changed_config_is_refused(finished, monkeypatch, capsys):
    root, path, _ = finished
    monkeypatch.chdir(root)
    before = _snapshot(root / "search")
    changed = _write(root / "changed.yaml", _tiny(tuner__seed=7))
    assert main(["--config", changed]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "tuner.seed" in err
    assert _snapshot(root / "search") == before


def test_overwrite_starts_over(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write("c.yaml", _tiny())
    os.makedirs("search")
    _write("search/notes.txt", "not a search")
    assert main(["--config", path, "--max-trials", "1"]) == 2
    assert main(["--config", path, "--max-trials", "1", "--epochs", "1,0", "--overwrite"]) == 0
    assert not os.path.exists("search/notes.txt")
    assert len(list(pathlib.Path("search").glob("trial_*"))) == 1


def test_failed_trials_are_recorded_and_search_completes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = _tiny(search_space__optimizer="sgd",
                search_space__learning_rate={"choice": [0.01, 1e38]},
                search_space__dropout={"choice": [0.0, 0.1]}, search_space__fine_tune_epochs=0,
                tuner__kind="grid", tuner__max_trials=4,
                tuner__max_consecutive_failed_trials=5)
    assert main(["--config", _write("c.yaml", cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count("| COMPLETED |") == 2 * 2  # trial lines and table rows
    assert "NaN or inf" in out
    rows = _table_rows("search/report.md")
    assert len(rows) == 4 and sum("| FAILED |" in r for r in rows) == 2
    best = yaml.safe_load(pathlib.Path("search/best_hyperparameters.yaml").read_text())
    assert best["build_finetuner"]["learning_rate"] == 0.01
    assert os.path.isdir("search/export/1")


def test_mirrored_strategy_trains_with_two_replicas(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = _tiny(search_space__learning_rate=0.01, search_space__dropout=0.0,
                tuner__max_trials=1, run__strategy="mirrored")
    assert main(["--config", _write("c.yaml", cfg)]) == 0
    out = capsys.readouterr().out
    assert "| COMPLETED |" in out and "replicas=2" in out
    best = yaml.safe_load(pathlib.Path("search/best_hyperparameters.yaml").read_text())
    assert best["fine_tune"]["batch_size"] == 2 * 16
    assert best["build_finetuner"]["strategy"] == "mirrored"
    assert os.path.isdir("search/export/1")


def test_missing_data_folder_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _write("c.yaml", _tiny())
    assert main(["--config", path, "--data", "no_such_folder"]) == 2
    assert "`data` must be data that loads. Loading it fails: " in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["c.yaml"]


def test_image_folder_source(tmp_path, monkeypatch, digits_target):
    monkeypatch.chdir(tmp_path)
    x, y = digits_target
    for label in (0, 1):
        os.makedirs(f"images/class_{label}")
        for i, image in enumerate(x[y == label][:8]):
            keras.utils.save_img(f"images/class_{label}/{i}.png", image, scale=False)
    cfg = _tiny(data__validation_split=0.25, data__image_size=32, tuner__max_trials=1)
    del cfg["data"]["per_class"]
    cfg["data"]["source"] = "images"
    assert main(["--config", _write("c.yaml", cfg)]) == 0
    best = yaml.safe_load(pathlib.Path("search/best_hyperparameters.yaml").read_text())
    assert best["build_finetuner"]["num_classes"] == 2
    labels = pathlib.Path("search/export/1/assets/labels.txt").read_text().split()
    assert labels == ["class_0", "class_1"]


@pytest.mark.slow
def test_isolated_trials_run_in_their_own_processes(tmp_path, monkeypatch, capsys):
    from tftransfer.search.hypermodel import FineTuneHyperModel

    monkeypatch.chdir(tmp_path)

    def not_here(*args, **kwargs):
        raise AssertionError("a trial ran in the search process")

    monkeypatch.setattr(FineTuneHyperModel, "fit", not_here)  # only this process
    cfg = _tiny(tuner__max_trials=2, run__isolate_trials=True)
    assert main(["--config", _write("c.yaml", cfg)]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^trial \S+ \| COMPLETED", out, re.M)) == 2
    assert "Reloading Tuner" not in out
    assert len(_table_rows("search/report.md")) == 2
    assert os.path.isdir("search/export/1")


def test_settings_map_knobs_to_builder_and_fine_tune_arguments():
    import keras_tuner as kt

    from tftransfer.search.hypermodel import FineTuneHyperModel
    from tftransfer.search.sources import SearchData

    space = validate(_tiny(
        search_space__unfreeze={"int_min": 1, "int_max": 3},
        search_space__schedule="warmup_cosine", search_space__regularizer_kind="l1_l2",
        search_space__regularizer_strength=1e-4,
        search_space__hidden_units={"choice": [[32, 16], []]},
        search_space__learning_rate=0.01, search_space__head_epochs=2))["search_space"]
    data = SearchData(None, None, ["a", "b", "c"], (32, 32, 3), num_train=100)
    hp = kt.HyperParameters()
    build, fit = FineTuneHyperModel(space, data).settings(hp)
    assert build["trainable"] == fit["unfreeze"] == "top:1"
    assert build["hidden_units"] == [32, 16] and build["regularizer"] == "l1_l2:0.0001,0.0001"
    assert build["learning_rate"] == {"class_name": "warmup_cosine", "config": {
        "learning_rate": 0.01, "decay_steps": 14, "warmup_steps": 1}}
    assert (build["num_classes"], build["input_shape"]) == (3, [32, 32, 3])
    assert set(hp.values) == {"unfreeze", "hidden_units", "dropout"}
    model = build_finetuner(**{**build, "backbone": DIGITS})
    assert model.head.get_layer("predictions").output.shape[-1] == 3


def test_seed_0_searches_the_same_values_every_run(tmp_path):
    # KerasTuner reads seed 0 as "draw a random seed"; ours means seed 0.
    from tftransfer.search.hypermodel import FineTuneHyperModel
    from tftransfer.search.sources import SearchData
    from tftransfer.search.tuners import make_tuner

    cfg = validate(_tiny(tuner__seed=0))
    data = SearchData(None, None, ["a", "b"], (32, 32, 3), num_train=10)
    values = []
    for name in ("first", "second"):
        tuner = make_tuner(cfg, FineTuneHyperModel(cfg["search_space"], data),
                           str(tmp_path / name), out=lambda line: None)
        values.append([tuner.oracle.create_trial(f"t{i}").hyperparameters.values
                       for i in range(3)])
    assert values[0] == values[1]
    assert len({v["dropout"] for v in values[0]}) == 3


def test_rerun_of_a_search_gives_the_same_scores(tmp_path, monkeypatch):
    # Each trial is seeded from tuner.seed and its values: a search is reproducible.
    monkeypatch.chdir(tmp_path)
    path = _write("c.yaml", _tiny(search_space__dropout=0.3, tuner__max_trials=2))
    scores = []
    for name in ("a", "b"):
        assert main(["--config", path, "--directory", name, "--epochs", "2,1"]) == 0
        scores.append([re.split(r" \| ", row)[3] for row in _table_rows(f"{name}/report.md")])
    assert scores[0] == scores[1] and len(scores[0]) == 2


@pytest.mark.slow
def test_hyperband_splits_its_epoch_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = _tiny(tuner__kind="hyperband", tuner__max_epochs=2, tuner__factor=2,
                search_space__learning_rate=0.01)
    assert main(["--config", _write("c.yaml", cfg)]) == 0
    rows = _table_rows("search/report.md")
    assert len(rows) >= 2 and all("| COMPLETED |" in r for r in rows)
    assert "tuner/" not in pathlib.Path("search/report.md").read_text()


@pytest.mark.slow
def test_chief_and_two_workers_on_loopback(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    config = _write(tmp_path / "tiny.yaml", _tiny(tuner__max_trials=4))
    assert main(["--config", config, "--workers", "2"]) == 0
    out = capfd.readouterr().out
    ran = [line.split()[1] for line in out.splitlines() if line.startswith("trial ")]
    assert sorted(ran) == ["0", "1", "2", "3"]  # each trial run once, by a worker
    table = [line for line in out.splitlines() if re.match(r"\| \d+ \| \d+ \|", line)]
    assert sorted(line.split("|")[2].strip() for line in table) == ["0", "1", "2", "3"]
    assert (tmp_path / "search" / "export" / "1" / "saved_model.pb").exists()
    assert sorted(p.name for p in (tmp_path / "search").glob("tuner*.json")) == [
        "tuner0.json", "tuner1.json"]
