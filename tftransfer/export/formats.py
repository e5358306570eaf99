"""Export one model in several named formats: `serving`, `tflite[-mode]`, `onnx`.

One table, one resolver: `check_formats` validates a list of names (a search
config's `run.export_formats`), `export_formats` writes each, every one
verified by its own writer:

| name | writes |
| --- | --- |
| `serving` | `<out>/<version>/`, the TF Serving SavedModel (`export_for_serving`) |
| `tflite`, `tflite-none` | `<out>/tflite/model_none.tflite` (float32) |
| `tflite-dynamic`, `tflite-float16`, `tflite-int8` | `<out>/tflite/model_<mode>.tflite` |
| `onnx` | `<out>/onnx/model.onnx` |

Example:
    >>> export_formats(model, "exports/digits", ["serving", "tflite-int8"],
    ...                representative_data=data)
    {'serving': 'exports/digits/1', 'tflite-int8': 'exports/digits/tflite/model_int8.tflite'}
"""

import os

FORMATS = ("serving", "tflite", "tflite-none", "tflite-dynamic", "tflite-float16",
           "tflite-int8", "onnx")


def check_formats(formats, argument="export_formats"):
    """Returns `formats` as a list of known, distinct names, or raises ValueError."""
    if isinstance(formats, str):
        formats = [formats]
    ok = isinstance(formats, (list, tuple)) and formats and all(
        isinstance(f, str) and f in FORMATS for f in formats) and len(set(formats)) == len(
        formats)
    if not ok:
        raise ValueError(f"`{argument}` must be a non-empty list of distinct names from "
                         f"{', '.join(FORMATS)}. Received: {argument}={formats!r}")
    return list(formats)


def export_formats(model, out_dir, formats, *, representative_data=None, validation_data=None,
                   class_names=None, metadata=None, overwrite=False):
    """Writes `model` in each of `formats` under `out_dir`; returns `{name: path}`.

    Args:
        model: A `FineTuner` (or Keras image model) or a `.keras` path.
        out_dir: The base directory (TF Serving's `--model_base_path` for `serving`).
        formats: Names from `FORMATS`.
        representative_data: Training images for `tflite-int8` (see `to_tflite`).
        validation_data: Images to verify the `.tflite` / `.onnx` forms on.
        class_names: One name per output; defaults to the model's.
        metadata: JSON-able dict for the serving export's `tftransfer.json`.
        overwrite: Replace existing `.tflite` / `.onnx` files.
    """
    from tftransfer.export import export_for_serving, to_onnx, to_tflite

    paths = {}
    for name in check_formats(formats, "formats"):
        if name == "serving":
            paths[name] = export_for_serving(model, out_dir, class_names=class_names,
                                             metadata=metadata)
        elif name == "onnx":
            paths[name] = to_onnx(model, os.path.join(out_dir, "onnx", "model.onnx"),
                                  validation_data=validation_data, class_names=class_names,
                                  overwrite=overwrite)["path"]
        else:
            mode = name.partition("-")[2] or "none"
            path = os.path.join(out_dir, "tflite", f"model_{mode}.tflite")
            paths[name] = to_tflite(model, path, quantization=mode,
                                    representative_data=representative_data,
                                    validation_data=validation_data, class_names=class_names,
                                    overwrite=overwrite)["path"]
    return paths
