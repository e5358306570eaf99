"""Post-training quantization on the bundled digits task: size, accuracy, latency.

Fine-tunes the quickstart model (saved_models/digits_cnn.keras, digits 5-9, 50
training images per class, head then whole model), converts it with
`tftransfer.export.to_tflite` in every mode, and prints side by side the file
size and validation accuracy of float (none), dynamic, float16 and int8, then
the LiteRT int8 batch-1 latency against the Keras model's `predict_on_batch`.
The last two lines are `int8_size_ratio: X` (int8 file / float32 file) and
`int8_accuracy_drop_pts: X` (Keras accuracy minus int8 accuracy, in points).

    python bench/quantization.py [--out runs/bench_quantization]

About 2-8 minutes on 2 shared CPU cores.
"""

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tftransfer import build_finetuner, fine_tune  # noqa: E402
from tftransfer.datasets import few_shot_split, load_digits_images  # noqa: E402
from tftransfer.export import to_tflite  # noqa: E402
from tftransfer.export._deploy_check import latency_ms  # noqa: E402
from tftransfer.export._litert import LiteRTModel  # noqa: E402

MODES = ("none", "dynamic", "float16", "int8")
NAMES = ["five", "six", "seven", "eight", "nine"]


def train(out, head_epochs, fine_tune_epochs):
    keras.utils.set_random_seed(0)
    x, y = load_digits_images(classes=(5, 6, 7, 8, 9))
    x_train, y_train, x_val, y_val = few_shot_split(x, y, per_class=50, seed=0)
    model = build_finetuner(str(ROOT / "saved_models" / "digits_cnn.keras"), num_classes=5,
                            dropout=0.2, learning_rate=1e-2)
    model.class_names = NAMES
    fine_tune(model, (x_train, y_train), (x_val, y_val), head_epochs=head_epochs,
              fine_tune_epochs=fine_tune_epochs,
              unfreeze="all", batch_size=32, output_dir=os.path.join(out, "run"), verbose=0)
    return model, (x_train, y_train), (x_val, y_val)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where the .tflite files go "
                        "(default: a temporary directory)")
    parser.add_argument("--head-epochs", type=int, default=30)
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="bench-quantization-")
    model, train_data, val = train(out, args.head_epochs, args.fine_tune_epochs)
    reports = {mode: to_tflite(model, os.path.join(out, f"digits_{mode}.tflite"),
                               quantization=mode, representative_data=train_data,
                               validation_data=val, overwrite=True) for mode in MODES}
    base = reports["none"]
    print(f"validation images: {base['images']}; Keras accuracy "
          f"{100 * base['reference_accuracy']:.2f}%")
    print(f"{'mode':<9}{'size (B)':>10}{'ratio':>8}{'accuracy %':>12}{'drop pts':>10}"
          f"{'agreement':>11}")
    for mode, r in reports.items():
        print(f"{mode:<9}{r['size_bytes']:>10}{r['size_bytes'] / base['size_bytes']:>8.3f}"
              f"{100 * r['accuracy']:>12.2f}{r['accuracy_drop_pts']:>10.2f}"
              f"{r['top1_agreement']:>11.4f}")
    images = val[0][:200]
    lite = LiteRTModel(reports["int8"]["path"])
    keras_ms = latency_ms(lambda b: model.predict_on_batch(b), images)
    lite_ms = latency_ms(lite, images)
    print(f"batch-1 latency, median of {len(images)}: LiteRT int8 {lite_ms:.3f} ms, "
          f"Keras predict_on_batch {keras_ms:.3f} ms ({keras_ms / lite_ms:.0f}x)")
    parts = {mode: _file_parts(r["path"]) for mode, r in reports.items()}
    print(f"{'bytes of':<9}" + "".join(f"{part:>11}" for part in parts["none"]))
    for mode, row in parts.items():
        print(f"{mode:<9}" + "".join(f"{n:>11}" for n in row.values()))
    weights = parts["int8"]["weights"] / parts["none"]["weights"]
    print(f"int8_weight_bytes_ratio: {weights:.3f}")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    print(f"int8_size_ratio: {reports['int8']['size_bytes'] / base['size_bytes']:.3f}")
    print(f"int8_accuracy_drop_pts: {reports['int8']['accuracy_drop_pts']:.2f}")


def _file_parts(path):
    """Bytes of a .tflite file by part: weights (constant buffers), quantization
    parameters (4-byte scale and 8-byte zero point per channel or tensor, each
    distinct array counted once, as it is stored),
    metadata (model metadata, labels zip) and the graph (the rest: tensor,
    operator and signature tables, alignment)."""
    from ai_edge_litert import schema_py_generated as schema

    content = open(path, "rb").read()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    meta = {entry.buffer for entry in model.metadata or []}
    data = [0 if b.data is None else len(b.data) for b in model.buffers]
    quant = [t.quantization for g in model.subgraphs for t in g.tensors if t.quantization]
    arrays = {(a.dtype.str, a.tobytes()) for q in quant for a in (q.scale, q.zeroPoint)
              if a is not None}  # each distinct array is stored once (SharingBuilder)
    parts = {"weights": sum(n for i, n in enumerate(data) if i not in meta),
             "quant": sum(len(raw) for _, raw in arrays),
             "metadata": sum(data[i] for i in meta) + len(content) - content.rfind(b"PK\x03\x04")}
    return {**parts, "graph": len(content) - sum(parts.values()), "total": len(content)}


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
