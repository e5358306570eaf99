"""Text backbones end to end: bundled embedding and BERT-style pair, data, export, predict.

Everything runs offline on `saved_models/` (built by `saved_models/build_text.py`
from corpora shipped in the gensim wheel): the text embedding, its `.keras`
twin, the tiny BERT-style preprocessor + encoder, and the held-apart labelled
task `saved_models/newsgroups` (atheism vs space) that pretraining never saw.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tftransfer import build_finetuner, export_for_serving, fine_tune, predict
from tftransfer.data import from_arrays, from_csv, from_text_directory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = os.path.join(ROOT, "saved_models")
EMBEDDING = os.path.join(SAVED, "text_embedding")
KERAS_TEXT = os.path.join(SAVED, "text_embedding.keras")
ENCODER = os.path.join(SAVED, "text_bert_encoder")
PREPROCESS = os.path.join(SAVED, "text_bert_preprocess")
TASK = os.path.join(SAVED, "newsgroups")
SENTENCES = ["the shuttle reached orbit after launch", "there is no evidence that god exists"]


def _task():
    names = sorted(os.listdir(TASK))
    texts, labels = [], []
    for label, name in enumerate(names):
        for entry in sorted(os.listdir(os.path.join(TASK, name))):
            with open(os.path.join(TASK, name, entry), encoding="utf-8") as f:
                texts.append(f.read())
            labels.append(label)
    return texts, np.asarray(labels), names


def _head_accuracy(features, labels, train, test, steps=300, rate=2.0):
    """A linear softmax head trained by full-batch gradient descent (the same for both)."""
    x = features / np.abs(features[train]).max()
    weights, bias = np.zeros((x.shape[1], 2)), np.zeros(2)
    onehot = np.eye(2)[labels[train]]
    for _ in range(steps):
        logits = x[train] @ weights + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(train)
        weights -= rate * x[train].T @ grad
        bias -= rate * grad.sum(0)
    return float(np.mean((x[test] @ weights + bias).argmax(1) == labels[test]))


def test_pretrained_embedding_beats_an_untrained_copy():
    """The same head on frozen features, 20 labelled posts per class, 5 seeds.

    The untrained copy keeps the vocabulary and the architecture; only its
    word vectors are re-drawn (unit-norm Gaussian, like the pretrained rows),
    so its mean vector is a random projection of the bag of words: a real
    baseline, not chance. Measured with build_text.py's artifacts: about
    0.86 (0.84-0.88, pretrained) vs 0.70 (0.64-0.76, untrained) over these seeds,
    each pretrained run above every untrained one; 0.06 is under half that margin.
    """
    texts, labels, _ = _task()
    model = build_finetuner(EMBEDDING, num_classes=2)
    pretrained = np.asarray(model.extract_features(tf.constant(texts)))
    (vectors,) = [w for w in model.backbone.weights if len(w.shape) == 2]
    rows = np.random.default_rng(0).normal(size=vectors.shape).astype("float32")
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[-1] = 0  # the unknown-word row stays zero, as in the pretrained vectors
    vectors.assign(rows)
    untrained = np.asarray(model.extract_features(tf.constant(texts)))
    scores = {"pretrained": [], "untrained": []}
    for seed in range(5):
        rng = np.random.default_rng(seed)
        train = np.concatenate([rng.choice(np.flatnonzero(labels == c), 20, replace=False)
                                for c in (0, 1)])
        test = np.setdiff1d(np.arange(len(labels)), train)
        scores["pretrained"].append(_head_accuracy(pretrained, labels, train, test))
        scores["untrained"].append(_head_accuracy(untrained, labels, train, test))
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    assert mean["pretrained"] >= mean["untrained"] + 0.06, scores
    assert min(scores["pretrained"]) > mean["untrained"], scores


def _weights(layer):
    return [np.array(w) for w in layer.weights]


@pytest.mark.parametrize("trainable", ["all", "none"])
def test_bert_pair_fine_tunes_with_encoder_trainable_or_frozen(trainable):
    data = from_text_directory(TASK, batch_size=16, validation_split=0.25, seed=0)
    model = build_finetuner(ENCODER, preprocessor=PREPROCESS, trainable=trainable,
                            num_classes=2, learning_rate=3e-3)
    assert model.input.dtype == "string" and model.class_names is None
    assert len(model.backbone.trainable_weights) == (0 if trainable == "none" else 29)
    before, head_before = _weights(model.backbone), _weights(model.head)
    fine_tune(model, data, head_epochs=1, fine_tune_epochs=1 if trainable == "all" else 0,
              unfreeze=trainable, verbose=0)
    changed = [not np.array_equal(a, np.array(b)) for a, b in zip(before, model.backbone.weights)]
    assert all(changed) if trainable == "all" else not any(changed)
    assert any(not np.array_equal(a, np.array(b)) for a, b in zip(head_before, model.head.weights))
    assert model.class_names == ["atheism", "space"]


def test_encoder_without_preprocessor_names_the_argument():
    with pytest.raises(ValueError, match=r"pass `preprocessor=`.*Received: preprocessor=None"):
        build_finetuner(ENCODER, num_classes=2)
    with pytest.raises(ValueError, match="takes strings itself"):
        build_finetuner(EMBEDDING, num_classes=2, preprocessor=PREPROCESS)


_RELOAD = """
import json, sys, keras, numpy as np, tensorflow as tf
import tftransfer
from tftransfer.predict import __main__ as cli
out = {}
for path in sys.argv[1:]:
    model = keras.models.load_model(path)
    out[path] = {"names": model.class_names, "input": str(model.input.dtype),
                 "scores": np.asarray(model(tf.constant(%r))).tolist()}
print(json.dumps(out))
cli.main([sys.argv[1], "--text", "the shuttle reached orbit"])
""" % (SENTENCES,)


def test_three_forms_train_save_reload_in_a_new_process_and_predict_identically(tmp_path):
    data = from_text_directory(TASK, batch_size=32, validation_split=0.25, seed=0)
    forms = {"embedding": (EMBEDDING, {}), "keras": (KERAS_TEXT, {}),
             "bert": (ENCODER, {"preprocessor": PREPROCESS})}
    paths, expected = [], {}
    for name, (source, extra) in forms.items():
        model = build_finetuner(source, num_classes=2, learning_rate=1e-2, **extra)
        fine_tune(model, data, head_epochs=2, fine_tune_epochs=1, verbose=0)
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        paths.append(path)
        expected[path] = np.asarray(model(tf.constant(SENTENCES)))
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run([sys.executable, "-c", _RELOAD, *paths], capture_output=True,
                         text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    reloaded = json.loads(next(line for line in lines if line.startswith("{")))
    for path in paths:
        assert reloaded[path]["names"] == ["atheism", "space"]
        assert reloaded[path]["input"] == "string"
        np.testing.assert_allclose(reloaded[path]["scores"], expected[path], atol=1e-6)
    assert any(line.startswith("the shuttle reached orbit") for line in lines), run.stdout


def test_export_answers_strings_and_predict_reads_sentences_and_files(tmp_path):
    data = from_text_directory(TASK, batch_size=32, validation_split=0.25, seed=0)
    model = build_finetuner(EMBEDDING, num_classes=2, learning_rate=2e-2)
    fine_tune(model, data, head_epochs=8, fine_tune_epochs=0, verbose=0)
    version = export_for_serving(model, str(tmp_path / "export"))
    loaded = tf.saved_model.load(version)
    outputs = loaded.signatures["serving_default"](texts=tf.constant(SENTENCES))
    np.testing.assert_allclose(outputs["probabilities"], model(tf.constant(SENTENCES)),
                               atol=1e-6)
    assert [label.decode() for label in outputs["labels"][:, 0].numpy()] == ["space", "atheism"]
    from tftransfer.export.verify import verify_export
    assert verify_export(version, out=lambda line: None) == []
    note = tmp_path / "note.txt"
    note.write_text(SENTENCES[0], encoding="utf-8")
    for source in (model, version):
        results = predict(source, [SENTENCES[1], str(note)])
        assert [r["label"] for r in results] == ["atheism", "space"]
        assert results[0]["text"] == SENTENCES[1] and results[1]["path"] == str(note)


def test_text_directory_skips_bad_files_and_splits_by_class(tmp_path):
    for name, n in (("ham", 6), ("spam", 4)):
        (tmp_path / name).mkdir()
        for i in range(n):
            (tmp_path / name / f"{i}.txt").write_text(f"{name} message {i}")
    (tmp_path / "ham" / "empty.txt").write_text("  \n")
    (tmp_path / "spam" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "spam" / "notes.md").write_text("not a .txt file")
    with pytest.warns(UserWarning, match="Skipped 2 files"):
        data = from_text_directory(tmp_path, validation_split=0.5, seed=0, batch_size=4,
                                   class_weight="balanced")
    assert sorted(os.path.basename(p) for p in data.skipped) == ["empty.txt", "latin1.txt"]
    assert data.class_names == ["ham", "spam"] and data.counts == {"ham": 3, "spam": 2}
    assert data.class_weight == pytest.approx({0: 5 / 6, 1: 5 / 4})
    texts = [t for batch, _ in data.validation for t in batch.numpy()]
    assert len(texts) == 5 and all(t.startswith((b"ham", b"spam")) for t in texts)


def test_csv_single_and_multi_label_and_arrays(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars,funny,long\n"
                    "\"great, really\",good,1,0\nawful,bad,0,1\nfine,good,1,1\n,bad,0,0\n"
                    "dull,bad,0,1\n")
    with pytest.warns(UserWarning, match="1 empty texts"):
        data = from_csv(path, text="review", label="stars", validation_split=0)
    assert data.class_names == ["bad", "good"] and data.skipped == ["row 3"]
    (texts, labels), = data.train.take(1).as_numpy_iterator()
    assert sorted(zip(texts.tolist(), labels.tolist())) == [
        (b"awful", 0), (b"dull", 0), (b"fine", 1), (b"great, really", 1)]
    with pytest.warns(UserWarning):
        multi = from_csv(path, text="review", label=["funny", "long"], validation_split=0)
    assert multi.multi_label and multi.class_names == ["funny", "long"]
    assert next(iter(multi.train))[1].shape == (4, 2)
    with pytest.raises(ValueError, match=r"`label`.*Received: label=\['stras'\]"):
        from_csv(path, text="review", label="stras")
    arrays = from_arrays(["good film", "bad film", "great", "poor"], [1, 0, 1, 0],
                         class_names=["neg", "pos"], validation_split=0.5)
    assert arrays.num_classes == 2 and arrays.validation is not None
    with pytest.raises(ValueError, match="labels among class_names"):
        from_arrays(["a", "b"], ["pos", "meh"], class_names=["neg", "pos"])


def test_frozen_embedding_features_are_cached_in_stage_one(tmp_path):
    data = from_text_directory(TASK, batch_size=32, validation_split=0.25, seed=0)
    model = build_finetuner(EMBEDDING, num_classes=2, learning_rate=1e-2)
    calls = []
    extract = model.extract_features
    model.extract_features = lambda texts: calls.append(1) or extract(texts)
    history = fine_tune(model, data, head_epochs=3, fine_tune_epochs=0, verbose=0,
                        feature_cache_dir=str(tmp_path / "features"))
    assert len(history.history["loss"]) == 3
    assert len(calls) >= 1 and os.listdir(tmp_path / "features")


def test_preprocessor_needing_text_ops_names_the_package_when_it_is_missing(monkeypatch):
    from tftransfer import _text_backbones

    def unregistered(*args, **kwargs):
        raise ValueError("Op type not registered 'CaseFoldUTF8' in binary")

    monkeypatch.setattr(_text_backbones, "_import_text_ops", lambda: False)
    monkeypatch.setattr(_text_backbones, "HubLayer", unregistered)
    with pytest.raises(ValueError, match=r"`preprocessor` needs TensorFlow Text ops.*"
                                         r"pip install tensorflow-text.*Received: preprocessor="):
        _text_backbones.preprocessor_layer("saved_models/text_bert_preprocess",
                                           "saved_models/text_bert_encoder")


def test_output_dir_run_of_a_text_model_reports_its_worst_texts(tmp_path):
    from tftransfer import interpret

    data = from_text_directory(TASK, batch_size=32, validation_split=0.25, seed=0)
    model = build_finetuner(EMBEDDING, num_classes=2, learning_rate=1e-2)
    fine_tune(model, data, head_epochs=2, fine_tune_epochs=0, verbose=0,
              output_dir=str(tmp_path / "run"))
    with open(tmp_path / "run" / "report.html", encoding="utf-8") as f:
        page = f.read()
    assert 'id="top-losses"' in page and "<th>text</th>" in page
    result = interpret(model, data)
    worst = result.top_losses(3)
    assert len(worst) == 3 and worst[0]["loss"] >= worst[-1]["loss"]
    assert isinstance(result.images[worst[0]["index"]], str)
    with pytest.raises(ValueError, match="`gradcam` needs an image model"):
        result.gradcam()
