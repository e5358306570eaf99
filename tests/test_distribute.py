"""Distribution: 2 mirrored replicas, 2 multi-worker processes (the chief-and-workers
search is in test_search.py)."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, SAVED, changed, weights_of

from tftransfer import build_finetuner
from tftransfer.distribute import (
    free_port,
    get_strategy,
    launch_tuning_cluster,
    worker_directory,
    worker_task,
)


def test_mirrored_trains_two_replicas_in_sync(small_batch):
    strategy = get_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2  # the 2 logical CPUs of conftest
    assert get_strategy("mirrored") is strategy  # one per process, reused by every trial
    model = build_finetuner(str(SAVED / "digits_cnn.keras"), num_classes=5, trainable="all",
                            strategy="mirrored")
    kernel = model.head.get_layer("predictions").kernel.value
    assert len(kernel.values) == 2
    before = weights_of(model.backbone)
    x, y = small_batch
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert changed(before, weights_of(model.backbone))
    np.testing.assert_array_equal(kernel.values[0].numpy(), kernel.values[1].numpy())
    # A second model on the same strategy, as the next search trial builds it.
    keras.backend.clear_session()
    again = build_finetuner(str(SAVED / "digits_cnn_hub"), num_classes=5, trainable="all",
                            strategy="mirrored")
    assert again.fit(x, y, batch_size=16, epochs=1, verbose=0).history["loss"][0] > 0


def _run_all(commands, envs, timeout=240):
    procs = [subprocess.Popen(c, env={**os.environ, **e}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c, e in zip(commands, envs)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outputs


MULTI_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from tftransfer.distribute import get_strategy
    strategy = get_strategy(sys.argv[3])  # first: MultiWorkerMirroredStrategy wants a fresh runtime
    import keras
    from tftransfer import build_finetuner, fine_tune
    from tftransfer.datasets import load_digits_images
    keras.utils.set_random_seed(0)
    x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
    order = np.random.default_rng(0).permutation(len(y))[:192]
    x, y = x[order], y[order]
    model = build_finetuner(sys.argv[1], num_classes=5, learning_rate=0.03, strategy=strategy)
    frozen = model.backbone.get_weights()[0].copy()
    history = fine_tune(model, (x[:128], y[:128]), (x[128:], y[128:]), head_epochs=6,
                        fine_tune_epochs=1, unfreeze="all", batch_size=32, shuffle=False,
                        verbose=0, output_dir=sys.argv[2], keep_best_stage=False)
    moved = float(np.abs(model.backbone.get_weights()[0] - frozen).max())
    print("RESULT " + json.dumps({
        "replicas": strategy.num_replicas_in_sync, "moved": moved,
        "weights": [w.ravel()[:50].tolist() for w in model.get_weights()],
        "loss": history.history["loss"], "val_loss": history.history["val_loss"],
        "val_accuracy": history.history["val_accuracy"], "stages": history.stages}))
""")


def _result(output):
    line = next((ln for ln in output.splitlines() if ln.startswith("RESULT ")), None)
    assert line, output[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_multi_worker_from_tf_config_trains_like_one_process(tmp_path):
    """Two workers on loopback fine-tune one model in sync, as one process would."""
    script = tmp_path / "worker.py"
    script.write_text(MULTI_WORKER)
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    envs = [{"TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                      "task": {"type": "worker", "index": i}}),
             "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)} for i in range(2)]
    envs.append({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), "TF_CONFIG": ""})
    model = str(SAVED / "digits_cnn.keras")
    commands = [[sys.executable, str(script), model, str(tmp_path / "run"), "multi_worker"]] * 2
    commands.append([sys.executable, str(script), model, str(tmp_path / "alone"), "none"])
    codes, outputs = _run_all(commands, envs)
    assert codes == [0, 0, 0], outputs
    chief, other, alone = (_result(o) for o in outputs)
    assert chief["replicas"] == other["replicas"] == 2  # one replica per worker, in sync
    assert chief["stages"] == {"head": [0, 6], "fine_tune": [6, 7]}
    assert chief["moved"] > 0  # stage 2 trained the backbone
    assert chief["weights"] == other["weights"]  # both workers hold the same model
    # The same global batch in one process gives the same losses and model (up to
    # the order of float sums, which Adam's normalised steps carry into the weights).
    np.testing.assert_allclose(chief["loss"], alone["loss"], rtol=2e-3)
    np.testing.assert_allclose(chief["val_loss"], alone["val_loss"], rtol=2e-3)
    diff = max(np.abs(np.subtract(a, b)).max() for a, b in zip(chief["weights"], alone["weights"]))
    assert diff < 2e-3, diff
    assert max(chief["val_accuracy"]) > 0.5  # well above chance (0.2) on held-out digits
    # Only the chief writes the user's directory; the other worker keeps its own state.
    assert (tmp_path / "run" / "curves.png").exists()
    assert (tmp_path / "run" / "fine_tune_state.json").exists()
    assert (tmp_path / "run" / "workers" / "worker-1" / "fine_tune_state.json").exists()
    assert not (tmp_path / "run" / "workers" / "worker-0").exists()


@pytest.mark.slow
def test_multi_worker_search_trains_each_trial_on_both_workers(tmp_path):
    """`--strategy multi_worker` on two workers: one trial, trained in sync, one export."""
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    envs = [{"TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                      "task": {"type": "worker", "index": i}}),
             "PYTHONPATH": str(ROOT)} for i in range(2)]
    command = [sys.executable, "-m", "tftransfer.search",
               "--config", str(ROOT / "tuner_configs" / "quickstart.yaml"),
               "--backbone", str(SAVED / "digits_cnn.keras"), "--strategy", "multi_worker",
               "--max-trials", "1", "--epochs", "2,1", "--directory", str(tmp_path / "search")]
    codes, outputs = _run_all([command] * 2, envs)
    assert codes == [0, 0], outputs
    lines = [[ln for ln in out.splitlines() if ln.startswith("trial 0 |")] for out in outputs]
    assert lines[0] and lines[1], outputs
    assert "COMPLETED" in lines[0][0] and lines[0][0].endswith("replicas=2")
    score = [ln[0].split("|")[2] for ln in lines]
    assert score[0] == score[1]  # the same trial, trained once across both workers
    search = tmp_path / "search"
    assert (search / "report.md").exists() and (search / "best_hyperparameters.yaml").exists()
    assert len(list((search / "export").iterdir())) == 1
    other = search / "workers" / "worker-1"
    assert (other / "trial_0" / "trial.json").exists()
    assert not (other / "report.md").exists() and not (other / "export").exists()


def test_worker_task_reads_tf_config(monkeypatch):
    cluster = {"worker": ["h:1", "h:2"]}
    for task, expected in [({"type": "worker", "index": 0}, ("worker", 0, True)),
                           ({"type": "worker", "index": 1}, ("worker", 1, False))]:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        assert worker_task() == expected
    with_chief = {"chief": ["h:0"], **cluster}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief,
                                                "task": {"type": "worker", "index": 0}}))
    assert worker_task() == ("worker", 0, False)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief,
                                                "task": {"type": "chief", "index": 0}}))
    assert worker_task() == ("chief", 0, True)
    monkeypatch.delenv("TF_CONFIG")
    assert worker_task() == (None, 0, True)
    # Outside multi-worker training every process writes where it was asked to.
    assert worker_directory("out", get_strategy("mirrored")) == "out"


def test_bad_strategy_and_workers():
    with pytest.raises(ValueError, match=r"Did you mean 'mirrored'.*Received: strategy='mirored'"):
        get_strategy("mirored")
    with pytest.raises(ValueError, match=r"Received: workers=0"):
        launch_tuning_cluster(["true"], workers=0)
    assert isinstance(get_strategy(tf.distribute.get_strategy()), tf.distribute.Strategy)


def test_fine_tune_enters_the_models_strategy_itself(digits_target):
    from tftransfer import fine_tune

    x, y = digits_target
    model = build_finetuner(str(SAVED / "digits_cnn.keras"), num_classes=5, strategy="mirrored")
    history = fine_tune(model, (x[:64], y[:64]), (x[64:128], y[64:128]), head_epochs=2,
                        fine_tune_epochs=1, unfreeze="top:1", batch_size=16, verbose=0)
    assert history.stages == {"head": (0, 2), "fine_tune": (2, 3)}
    assert model.distribute_strategy.num_replicas_in_sync == 2
