"""Trial workers: a killed worker's trial FAILED, recycling, quiet output, fast --help.

The CLI runs in a subprocess. A `sitecustomize` module on the workers'
PYTHONPATH (a test hook; only processes started as trial workers load it)
wraps `FineTuneHyperModel.fit` to log each trial's worker PID and, on
request, to block one trial after writing a marker file, so the test kills
that worker on a condition, never on a timer.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, SAVED

DIGITS = str(SAVED / "digits_cnn.keras")
TRIAL_LINE = re.compile(r"^trial (\S+) \| (\w+)\s*\|", re.M)
NOISE = ("absl::InitializeLog", "cudart_stub", "cpu_feature_guard", "cuda_platform", "cuInit",
         "To enable the following instructions")

HOOK = '''
import os

if os.environ.get("TFTRANSFER_WORKER_PARENT") and os.environ.get("HOOK_DIR"):
    import pathlib
    import time

    from tftransfer.search.hypermodel import FineTuneHyperModel

    _fit = FineTuneHyperModel.fit
    _dir = pathlib.Path(os.environ["HOOK_DIR"])

    def fit(self, hp, model, *args, **kwargs):
        with open(_dir / "fits.txt", "a") as f:
            f.write(f"{os.getpid()}\\n")
        calls = len((_dir / "fits.txt").read_text().split())
        if str(calls) == os.environ.get("HOOK_BLOCK_CALL"):
            (_dir / "blocked").write_text(str(os.getpid()))
            while True:  # until the test kills this worker
                time.sleep(0.1)
        return _fit(self, hp, model, *args, **kwargs)

    FineTuneHyperModel.fit = fit
'''


def _config(tmp_path, **run):
    cfg = {
        "data": {"source": "digits", "per_class": 5, "validation_split": 0.2},
        "search_space": {"backbone": DIGITS, "learning_rate": {"choice": [0.003, 0.01]},
                         "dropout": {"min": 0.0, "max": 0.5},
                         "batch_size": 16, "head_epochs": 1, "fine_tune_epochs": 1},
        "tuner": {"kind": "random", "max_trials": 3, "seed": 1},
        "run": {"directory": "search", **run},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env(tmp_path, **more):
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]),
           "HOOK_DIR": str(hook), "PYTHONUNBUFFERED": "1", **more}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the search quiets TensorFlow itself
    return env


def _search(tmp_path, env, *flags):
    command = [sys.executable, "-m", "tftransfer.search", "--config", _config(tmp_path),
               *flags]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _report_statuses(tmp_path):
    text = (tmp_path / "search" / "report.md").read_text()
    return dict(re.findall(r"^\| \d+ \| (\S+) \| (\w+) \|", text, re.M))


def _wait_for(path, proc, timeout=600):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def test_killed_worker_fails_its_trial_and_a_new_worker_finishes_the_search(tmp_path):
    env = _env(tmp_path, HOOK_BLOCK_CALL="2")  # the second trial blocks in its fit
    proc = _search(tmp_path, env)
    pid = int(_wait_for(tmp_path / "hook" / "blocked", proc))
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    lines = dict(TRIAL_LINE.findall(out))
    assert lines == {"0": "COMPLETED", "1": "FAILED", "2": "COMPLETED"}, out
    failed = next(line for line in out.splitlines() if line.startswith("trial 1 | FAILED"))
    assert f"pid {pid}" in failed and "SIGKILL" in failed
    assert _report_statuses(tmp_path) == lines
    pids = (tmp_path / "hook" / "fits.txt").read_text().split()
    assert len(pids) == 3 and pids[1] == str(pid) and pids[2] != str(pid)
    assert (tmp_path / "search" / "export" / "1" / "saved_model.pb").exists()
    for noise in NOISE:  # TensorFlow's start-up lines, from the CLI and its workers
        assert noise not in out + err


def test_killed_search_takes_its_worker_along_and_resumes(tmp_path):
    import psutil

    env = _env(tmp_path, HOOK_BLOCK_CALL="2")
    first = _search(tmp_path, env)
    worker = psutil.Process(int(_wait_for(tmp_path / "hook" / "blocked", first)))
    first.kill()  # the search process, mid-trial; its worker must not run on alone
    out, _ = first.communicate(timeout=60)
    worker.wait(timeout=60)
    assert dict(TRIAL_LINE.findall(out)) == {"0": "COMPLETED"}
    second = subprocess.run(first.args, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    # KerasTuner retries the interrupted trial; the finished one is not run again.
    assert dict(TRIAL_LINE.findall(second.stdout)) == {"1": "COMPLETED", "2": "COMPLETED"}
    assert _report_statuses(tmp_path) == {str(i): "COMPLETED" for i in range(3)}


def test_worker_is_replaced_after_worker_max_trials(tmp_path):
    config = _config(tmp_path, worker_max_trials=2)
    proc = subprocess.run([sys.executable, "-m", "tftransfer.search", "--config", config],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert dict(TRIAL_LINE.findall(proc.stdout)) == {str(i): "COMPLETED" for i in range(3)}
    pids = (tmp_path / "hook" / "fits.txt").read_text().split()
    assert len(pids) == 3 and pids[0] == pids[1] != pids[2]


def test_help_and_config_errors_do_not_import_tensorflow(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search_space: {backbone: a}\nrun: {worker_max_trials: 0}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {}
    for name, args in (("help", ["--help"]), ("bad", ["--config", str(bad)])):
        runs[name] = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "tftransfer.search", *args], cwd=tmp_path,
            capture_output=True, text=True, timeout=120, env=env)
        imported = {line.split("|")[-1].strip().split(".")[0]
                    for line in runs[name].stderr.splitlines() if line.startswith("import time:")}
        assert not imported & {"tensorflow", "keras", "keras_tuner"}, name
    assert runs["help"].returncode == 0 and "--verbose" in runs["help"].stdout
    assert runs["bad"].returncode == 2
    assert ("`run.worker_max_trials` must be an integer >= 1. "
            "Received: run.worker_max_trials=0") in runs["bad"].stderr


def test_data_that_does_not_load_exits_2_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tftransfer.search", "--config",
                           _config(tmp_path), "--data", "no_such_folder"], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "`data` must be data that loads. Loading it fails: " in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "hook"]


def test_tensorflow_start_up_lines_are_held_back_unless_verbose(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    err = {mode: subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-m",
                                 "tftransfer.search._quiet", mode],
                                capture_output=True, text=True, timeout=300, env=env).stderr
           for mode in ("verbose", "quiet")}
    if not any(noise in err["verbose"] for noise in NOISE):
        pytest.skip("this TensorFlow build prints no start-up lines here")
    assert err["quiet"].strip() == "after import"


INVALID_RUN = [
    ({"worker_max_trials": 0},
     "`run.worker_max_trials` must be an integer >= 1. Received: run.worker_max_trials=0"),
    ({"worker_max_rss_growth_mb": -5},
     "`run.worker_max_rss_growth_mb` must be a number > 0. "
     "Received: run.worker_max_rss_growth_mb=-5"),
    ({"dtype_policy": "float16"}, "`run.dtype_policy` must be one of 'float32', "
     "'mixed_float16', 'mixed_bfloat16'. Received: run.dtype_policy='float16'"),
    ({"jit_compile": "yes"}, "`run.jit_compile` must be true, false or 'auto'. "
     "Received: run.jit_compile='yes'"),
    ({"jit_compile": 1},
     "`run.jit_compile` must be true, false or 'auto'. Received: run.jit_compile=1"),
]


@pytest.mark.parametrize("run,message", INVALID_RUN)
def test_invalid_run_keys(run, message):
    from tftransfer.search import ConfigError, validate

    with pytest.raises(ConfigError) as info:
        validate({"search_space": {"backbone": "a"}, "run": run})
    assert str(info.value) == message


def test_run_defaults_and_precision_passed_to_build_finetuner_when_set():
    from tftransfer.search import validate
    from tftransfer.search.hypermodel import FineTuneHyperModel
    from tftransfer.search.sources import SearchData

    cfg = validate({"search_space": {"backbone": DIGITS}})
    assert {k: cfg["run"][k] for k in ("worker_max_trials", "worker_max_rss_growth_mb",
                                       "dtype_policy", "jit_compile")} == {
        "worker_max_trials": 10, "worker_max_rss_growth_mb": 1024.0,
        "dtype_policy": "float32", "jit_compile": "auto"}
    data = SearchData(None, None, ["a", "b"], (32, 32, 3), num_train=10)
    import keras_tuner as kt

    default, _ = FineTuneHyperModel(cfg["search_space"], data).settings(kt.HyperParameters())
    assert "dtype_policy" not in default and "jit_compile" not in default
    mixed, _ = FineTuneHyperModel(cfg["search_space"], data, dtype_policy="mixed_bfloat16",
                                  jit_compile=False).settings(kt.HyperParameters())
    assert (mixed["dtype_policy"], mixed["jit_compile"]) == ("mixed_bfloat16", False)


def test_config_lists_the_optimizers_get_optimizer_accepts():
    from tftransfer import optim
    from tftransfer.search import config

    assert list(config.OPTIMIZERS) == optim.optimizer_names()


def test_worker_settings_may_change_on_resume():
    from tftransfer.search import runner, validate

    old = validate({"search_space": {"backbone": "a"}})
    new = validate({"search_space": {"backbone": "a"},
                    "run": {"worker_max_trials": 3, "worker_max_rss_growth_mb": None}})
    assert runner._comparable(old) == runner._comparable(new)
