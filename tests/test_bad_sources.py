"""Sources that are not what they claim: each refused with a ValueError naming `source`."""

import shutil

import h5py
import numpy as np
import pytest
from conftest import SAVED

from tftransfer import build_finetuner, load_backbone
from tftransfer.layers import HubLayer

UNREACHABLE = "http://127.0.0.1:9/tftransfer/digits_cnn/1"  # The discard port: refused at once.


def _text_named_keras(tmp):
    (tmp / "model.keras").write_text("this is a text file, not a Keras archive\n")
    return lambda: load_backbone(str(tmp / "model.keras"))


def _text_named_h5(tmp):
    (tmp / "model.h5").write_text("not an HDF5 file\n")
    return lambda: load_backbone(str(tmp / "model.h5"))


def _h5_without_model(tmp):
    with h5py.File(tmp / "data.h5", "w") as f:
        f["x"] = np.zeros(3)
    return lambda: load_backbone(str(tmp / "data.h5"))


def _saved_model_with(pb_bytes, original="digits_cnn_hub"):
    def builder(tmp):
        shutil.copytree(SAVED / original, tmp / "model")
        (tmp / "model" / "saved_model.pb").write_bytes(pb_bytes(SAVED / original / "saved_model.pb"))
        return lambda: load_backbone(str(tmp / "model"))
    return builder


def _corrupt_behind_hub_prefix(tmp):
    shutil.copytree(SAVED / "digits_cnn_hub", tmp / "model")
    (tmp / "model" / "saved_model.pb").write_bytes(_garbage(None))
    return lambda: load_backbone(f"hub:{tmp / 'model'}")


def _garbage(path):
    return b"\x00\x01garbage" * 20


def _truncated(path):
    return path.read_bytes()[:1000]


def _unreachable_url(tmp):
    return lambda: load_backbone(UNREACHABLE)


def _unreachable_url_in_hub_layer(tmp):
    return lambda: HubLayer(UNREACHABLE)


def _two_inputs(tmp):
    return lambda: build_finetuner(str(SAVED / "digits_gan_generator.keras"), num_classes=5)


def _unknown_extension(tmp):
    (tmp / "model.txt").write_text("weights?\n")
    return lambda: load_backbone(str(tmp / "model.txt"))


def _directory_without_saved_model(tmp):
    (tmp / "empty").mkdir()
    return lambda: load_backbone(str(tmp / "empty"))


BAD_SOURCES = [
    ("text_file_named_keras", _text_named_keras, ValueError,
     r"named like a \.keras archive \(a zip file\), but the file is not one: it starts with "
     r"b'this is a text f'"),
    ("text_file_named_h5", _text_named_h5, ValueError,
     r"named like an HDF5 model file \(\.h5\), but the file is not one"),
    ("h5_without_a_model", _h5_without_model, ValueError,
     r"named like an HDF5 model file with a Keras model in it, but the file is not one"),
    ("garbage_saved_model_pb", _saved_model_with(_garbage), ValueError,
     r"saved_model\.pb is corrupt or truncated \(Error parsing message"),
    ("truncated_saved_model_pb", _saved_model_with(_truncated), ValueError,
     r"saved_model\.pb is corrupt or truncated"),
    ("corrupt_saved_model_pb_as_hub_dir", _corrupt_behind_hub_prefix, ValueError,
     r"saved_model\.pb is corrupt or truncated"),
    ("empty_saved_model_pb", _saved_model_with(lambda p: b""), ValueError,
     r"saved_model\.pb is corrupt or truncated \(it holds no MetaGraph\)"),
    ("corrupt_tf_keras_saved_model_pb", _saved_model_with(_garbage, "digits_cnn_tfkeras"),
     ValueError, r"saved_model\.pb is corrupt or truncated"),
    ("unreachable_tfhub_url", _unreachable_url, ValueError,
     r"`source` is a TF-Hub URL that is neither in the cache nor reachable .*Connection refused"
     r".*`TFHUB_CACHE_DIR` \(now .*\) at the cache .*`hub:/local/dir`"),
    ("unreachable_url_in_hub_layer", _unreachable_url_in_hub_layer, ValueError,
     r"`handle` is a TF-Hub URL .*`TFHUB_CACHE_DIR`.*`hub:/local/dir`\. Received: handle="),
    ("two_input_backbone", _two_inputs, ValueError,
     r"`source` is a model with 2 inputs \(latents, labels\); a backbone takes one image input"),
    ("unknown_extension", _unknown_extension, ValueError,
     r"`source` is a file of a format tftransfer cannot read"),
    ("directory_without_saved_model", _directory_without_saved_model, ValueError,
     r"`source` is a directory but not a SavedModel"),
    ("missing_path", lambda tmp: lambda: load_backbone(str(tmp / "gone.keras")), ValueError,
     r"`source` names a path that does not exist"),
    ("misspelt_application", lambda tmp: lambda: load_backbone("mobilenet_v3"), ValueError,
     r"Did you mean 'mobilenet_v2'"),
]


@pytest.mark.filterwarnings("ignore:Keras 3 could not read")  # Before the tf-keras fallback.
@pytest.mark.parametrize("builder,error,fragment", [row[1:] for row in BAD_SOURCES],
                         ids=[row[0] for row in BAD_SOURCES])
def test_bad_source_is_refused_clearly(builder, error, fragment, tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub_cache"))
    with pytest.raises(error, match=fragment) as caught:
        builder(tmp_path)()
    assert "Received: source=" in str(caught.value) or "Received: handle=" in str(caught.value)
