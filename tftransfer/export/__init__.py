"""Export fine-tuned Keras models as versioned SavedModels for TF Serving.

`export_for_serving(model, "exports/digits")` writes `exports/digits/<N>/`;
`verify_export(dir)` (or `python -m tftransfer.export verify DIR`) loads an
export and checks its signatures and files. The names and files of the
serving contract live in `tftransfer.export._contract`; docs/serving.md has
the tables and the serving recipes.

`to_tflite(model, "m.tflite", quantization="int8", representative_data=...)`
and `to_onnx(model, "m.onnx")` write verified on-device / cross-runtime forms
with their labels inside (docs/deploy.md).
"""

from tftransfer.export._contract import existing_versions
from tftransfer.export._deploy_check import VerificationError
from tftransfer.export._writer import export_for_serving
from tftransfer.export.onnx import to_onnx
from tftransfer.export.tflite import read_labels, to_tflite
from tftransfer.export.verify import VerifyError, resolve_version_dir, verify_export

__all__ = ["VerificationError", "VerifyError", "existing_versions", "export_for_serving",
           "read_labels", "resolve_version_dir", "to_onnx", "to_tflite", "verify_export"]
